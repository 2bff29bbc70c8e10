// Sustained load for `make bench`: a constant rate of batches (RATE batches/s
// of BATCH events, for DURATION), so the store's ceiling can be offered for
// minutes and the bench can see whether ingest, flushing and rollups keep up.
import { check } from "k6";
import { postBatch } from "./lib/events.js";

export const options = {
  scenarios: {
    sustained: {
      executor: "constant-arrival-rate",
      rate: parseInt(__ENV.RATE || "50", 10),
      timeUnit: "1s",
      duration: __ENV.DURATION || "5m",
      preAllocatedVUs: 50,
      maxVUs: 400,
    },
  },
  systemTags: ["status", "method", "name", "scenario", "expected_response"],
  thresholds: {
    "http_req_duration{name:POST /events}": ["p(95)<250"],
  },
};

export default function () {
  check(postBatch(parseInt(__ENV.BATCH || "100", 10)), {
    "POST /events is 202": (r) => r.status === 202,
  });
}
