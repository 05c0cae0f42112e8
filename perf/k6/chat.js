// Chat-completion load for perf/run.py: closed-loop VUs or an open arrival rate, optional
// warm-up, optional second (rate-limited) tenant. Successes and their latency count only when
// they finish inside the measured window; errors, 429s (apart from errors) and stalls count for
// every request, however late. Parameters come from the environment:
//   BASE (…/v1), KEY, MODEL, STREAM (fraction 0..1 of requests that stream), VUS, DURATION (s),
//   BASE_STREAM and MODEL_STREAM (where and as which model streams go; default BASE, MODEL),
//   LAST_WORD (the reply's last word: a success holds it),
//   WARMUP (s), RATE (req/s: open model instead of VUS loops), MIN_EVENTS (SSE data events a
//   complete stream has), STALL_MS (a stream slower than this is a stall), KEY2 + RATE2 (the
//   limited tenant), GRACE (s a started request may still finish after the end), SUMMARY (path
//   of the JSON summary).
import http from 'k6/http';
import { Counter, Trend } from 'k6/metrics';

const E = __ENV;
const VUS = parseInt(E.VUS || '1');
const DURATION = parseFloat(E.DURATION || '10');
const WARMUP = parseFloat(E.WARMUP || '0');
const RATE = parseFloat(E.RATE || '0');
const RATE2 = parseFloat(E.RATE2 || '0');
const STREAM = parseFloat(E.STREAM || '0');
const MIN_EVENTS = parseInt(E.MIN_EVENTS || '1');
const STALL_MS = parseFloat(E.STALL_MS || '0');
const GRACE = `${parseFloat(E.GRACE || '30')}s`;
const LAST_WORD = E.LAST_WORD || '';

const ok = new Counter('ok');
const okStream = new Counter('ok_stream');
const errors = new Counter('errors');
const limited = new Counter('limited');
const stalls = new Counter('stalls');
const okSmall = new Counter('ok_small');
const latency = new Trend('latency', true);
const ttfb = new Trend('ttfb', true);

function mainScenario() {
  const common = { exec: 'measured', startTime: `${WARMUP}s`, gracefulStop: GRACE };
  if (RATE > 0) {
    return { ...common, executor: 'constant-arrival-rate', rate: RATE, timeUnit: '1s',
             duration: `${DURATION}s`, preAllocatedVUs: Math.max(VUS, 8), maxVUs: VUS * 4 + 64 };
  }
  return { ...common, executor: 'constant-vus', vus: VUS, duration: `${DURATION}s` };
}

const scenarios = { main: mainScenario() };
if (WARMUP > 0) {
  scenarios.warmup = { executor: 'constant-vus', vus: VUS, duration: `${WARMUP}s`,
                       exec: 'warm', gracefulStop: '5s' };
}
if (E.KEY2 && RATE2 > 0) {
  scenarios.limited = { executor: 'constant-arrival-rate', rate: RATE2, timeUnit: '1s',
                        duration: `${DURATION}s`, startTime: `${WARMUP}s`, preAllocatedVUs: 16,
                        maxVUs: 64, exec: 'limitedTenant', gracefulStop: GRACE };
}

export const options = {
  scenarios,
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(99)', 'max', 'count'],
  discardResponseBodies: false,
  noConnectionReuse: false,
  insecureSkipTLSVerify: true,
};

const PROMPT = 'hello '.repeat(20).trim();

function body(stream) {
  const model = stream ? (E.MODEL_STREAM || E.MODEL) : E.MODEL;
  return JSON.stringify({ model, stream, max_tokens: 64,
                          messages: [{ role: 'user', content: PROMPT }] });
}

const BODIES = { true: body(true), false: body(false) };
const URLS = { true: `${E.BASE_STREAM || E.BASE}/chat/completions`,
               false: `${E.BASE}/chat/completions` };

function params(key) {
  return { headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
           timeout: '120s' };
}

const PARAMS = params(E.KEY);
const PARAMS2 = params(E.KEY2 || E.KEY);

export function setup() {
  return { deadline: Date.now() + (WARMUP + DURATION) * 1000 };
}

function complete(res, stream) {
  if (res.status !== 200 || typeof res.body !== 'string') return false;
  if (LAST_WORD && res.body.indexOf(LAST_WORD) < 0) return false;
  if (!stream) return res.body.indexOf('"choices"') >= 0;
  return res.body.endsWith('data: [DONE]\n\n') && res.body.split('data:').length - 1 >= MIN_EVENTS;
}

export function warm() {
  const stream = STREAM > 0 && Math.random() < STREAM;
  http.post(URLS[stream], BODIES[stream], PARAMS);
}

export function measured(data) {
  const stream = STREAM > 0 && (STREAM >= 1 || Math.random() < STREAM);
  const res = http.post(URLS[stream], BODIES[stream], PARAMS);
  if (res.status === 429) {
    limited.add(1);
  } else if (!complete(res, stream)) {
    errors.add(1);
  } else {
    if (STALL_MS > 0 && res.timings.duration > STALL_MS) stalls.add(1);
    if (Date.now() > data.deadline) return;
    ok.add(1);
    if (stream) okStream.add(1);
    latency.add(res.timings.duration);
    ttfb.add(res.timings.waiting);
  }
}

export function limitedTenant(data) {
  const res = http.post(URLS.false, BODIES.false, PARAMS2);
  if (res.status === 429) limited.add(1);
  else if (!complete(res, false)) errors.add(1);
  else if (Date.now() <= data.deadline) okSmall.add(1);
}

export function handleSummary(data) {
  return { [E.SUMMARY || 'summary.json']: JSON.stringify(data) };
}
