// The one event generator every k6 script shares, and the bookkeeping the
// verification step (scripts/k6_verify.py) reads back from k6's JSON output.
//
// Every event of a run carries the run id: accounts are `k6-<run>-a<n>` and
// event ids are `<batch id>.<index>`, where a batch id is unique in the run.
// Each POST records one `batch_outcome` sample tagged with its batch id and
// outcome, so the verifier knows exactly which events were answered 202
// (must be stored exactly once), refused (must not be stored) or unknown
// (timeout: all or nothing).
import http from "k6/http";
import exec from "k6/execution";
import { Counter, Trend } from "k6/metrics";

export const BASE_URL = __ENV.BASE_URL || "http://127.0.0.1:8000";
export const RUN_ID = __ENV.RUN_ID || `r${Date.now()}`;
export const ACCOUNTS = parseInt(__ENV.ACCOUNTS || "20", 10);
export const USERS = parseInt(__ENV.USERS || "500", 10);
export const TYPES = ["page_view", "message_sent", "call_made", "form_submitted", "login", "custom"];
const JSON_HEADERS = { "Content-Type": "application/json" };

export const batchOutcome = new Counter("batch_outcome");
export const acceptedEvents = new Counter("accepted_events");
export const shedRequests = new Counter("shed_requests");
export const acceptedDuration = new Trend("accepted_duration", true);

export function accountId(n) {
  return `k6-${RUN_ID}-a${n}`;
}

function pick(n) {
  return Math.floor(Math.random() * n);
}

export function batchId() {
  const scenario = exec.scenario.name.replace(/[^A-Za-z0-9]/g, "");
  return `${RUN_ID}-${scenario}-${exec.vu.idInTest}-${exec.vu.iterationInScenario}`;
}

export function makeBatch(id, size) {
  const now = Date.now();
  const events = [];
  for (let i = 0; i < size; i++) {
    const event = {
      event_id: `${id}.${i}`,
      account_id: accountId(pick(ACCOUNTS)),
      user_id: `user_${pick(USERS)}`,
      type: TYPES[pick(TYPES.length)],
      timestamp: new Date(now - pick(5000)).toISOString(),
    };
    if (i % 10 === 0) {
      event.metadata = { source: "k6", page: `/p/${pick(50)}`, ms: pick(3000) };
    }
    events.push(event);
  }
  return events;
}

// POST one batch and record what happened to it. Returns the response.
export function postBatch(size, params = {}) {
  const id = batchId();
  const res = http.post(`${BASE_URL}/events`, JSON.stringify(makeBatch(id, size)), {
    headers: JSON_HEADERS,
    tags: { name: "POST /events" },
    ...params,
  });
  let outcome = "unknown";
  if (res.status === 202) {
    outcome = "accepted";
    acceptedEvents.add(size);
    acceptedDuration.add(res.timings.duration);
  } else if (res.status === 429 || res.status === 503) {
    outcome = "shed";
    shedRequests.add(1, { status: String(res.status) });
  } else if (res.status >= 400 && res.status < 500) {
    outcome = "refused";
  }
  batchOutcome.add(size, { batch: id, outcome });
  return res;
}

export function getSummary(window = "1h") {
  const account = accountId(pick(ACCOUNTS));
  return http.get(`${BASE_URL}/summary/${account}?window=${window}&top=5`, {
    tags: { name: "GET /summary" },
  });
}
