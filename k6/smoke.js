// A few VUs for 10 s: every check passes, nothing is refused.
import { check } from "k6";
import { getSummary, postBatch } from "./lib/events.js";

export const options = {
  vus: parseInt(__ENV.VUS || "3", 10),
  duration: __ENV.DURATION || "10s",
  systemTags: ["status", "method", "name", "scenario", "expected_response"],
  thresholds: {
    checks: ["rate==1"],
    http_req_failed: ["rate==0"],
  },
};

export default function () {
  const res = postBatch(10);
  check(res, {
    "POST /events is 202": (r) => r.status === 202,
    "202 counts the batch": (r) => r.status === 202 && r.json("count") === 10,
  });
  const summary = getSummary("1h");
  check(summary, {
    "GET /summary is 200": (r) => r.status === 200,
    "summary has a total": (r) => r.status === 200 && typeof r.json("total") === "number",
  });
}
