// A spike: constant arrival rate at BASE_RATE batches/s of 100 events, then
// 10× for 30 s, then back. 429/503 (with Retry-After) are load shedding:
// expected, counted apart, never a failure. Thresholds hold the accepted
// requests' latency and forbid anything else (5xx other than 503, timeouts).
import { check } from "k6";
import http from "k6/http";
import { postBatch } from "./lib/events.js";

const base = parseInt(__ENV.BASE_RATE || "5", 10);
const peak = base * parseInt(__ENV.SPIKE_FACTOR || "10", 10);
const batch = parseInt(__ENV.BATCH || "100", 10);

http.setResponseCallback(http.expectedStatuses(202, 429, 503));

export const options = {
  scenarios: {
    spike: {
      executor: "ramping-arrival-rate",
      startRate: base,
      timeUnit: "1s",
      preAllocatedVUs: Math.max(20, Math.ceil(peak / 4)),
      maxVUs: Math.max(100, peak * 2),
      stages: [
        { duration: "20s", target: base },
        { duration: "5s", target: peak },
        { duration: "30s", target: peak },
        { duration: "5s", target: base },
        { duration: "30s", target: base },
      ],
    },
  },
  systemTags: ["status", "method", "name", "scenario", "expected_response"],
  thresholds: {
    accepted_duration: [`p(95)<${__ENV.ACCEPTED_P95_MS || "250"}`],
    http_req_failed: ["rate<0.001"],
    checks: ["rate>0.999"],
  },
};

export default function () {
  const res = postBatch(batch, { timeout: "10s" });
  check(res, {
    "202, or 429/503 with Retry-After": (r) =>
      r.status === 202 || ((r.status === 429 || r.status === 503) && !!r.headers["Retry-After"]),
  });
}
