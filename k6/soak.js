// Optional long run (10 min by default) at a steady rate, to watch memory
// growth of the service processes and Redis over time (the runner samples both).
import { check } from "k6";
import { getSummary, postBatch } from "./lib/events.js";

export const options = {
  scenarios: {
    soak: {
      executor: "constant-arrival-rate",
      rate: parseInt(__ENV.RATE || "50", 10),
      timeUnit: "1s",
      duration: __ENV.DURATION || "10m",
      preAllocatedVUs: 20,
      maxVUs: 200,
    },
  },
  systemTags: ["status", "method", "name", "scenario", "expected_response"],
  thresholds: {
    "http_req_duration{name:POST /events}": ["p(95)<100"],
    "http_req_duration{name:GET /summary}": [`p(95)<${__ENV.SUMMARY_P95_MS || "100"}`],
    http_req_failed: ["rate<0.001"],
  },
};

export default function () {
  check(postBatch(50), { "POST /events is 202": (r) => r.status === 202 });
  if (Math.random() < 0.1) {
    check(getSummary("1h"), { "GET /summary is 200": (r) => r.status === 200 });
  }
}
