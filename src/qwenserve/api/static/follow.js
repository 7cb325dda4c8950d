// Following a job to its end. EventSource cannot send the x-api-key header the events endpoint
// authenticates with, so the stream is read with fetch() and parsed here; if it cannot be opened,
// or breaks before the job's end, the status is polled every POLL_MS instead (same fields).

const POLL_MS = 500;
const TERMINAL = new Set(["COMPLETED", "FAILED"]);

/** Split a text/event-stream body into events ({event, id, data}); comments (pings) dropped. */
export function parseEvents(buffer) {
  const events = [];
  const blocks = buffer.split(/\r?\n\r?\n/);
  const rest = blocks.pop(); // the last block may still be arriving
  for (const block of blocks) {
    const event = { event: "message", id: null, data: "" };
    let hasData = false;
    for (const line of block.split(/\r?\n/)) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon === -1 ? line : line.slice(0, colon);
      let value = colon === -1 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event.event = value;
      else if (field === "id") event.id = value;
      else if (field === "data") {
        event.data = hasData ? `${event.data}\n${value}` : value;
        hasData = true;
      }
    }
    if (hasData) events.push(event);
  }
  return { events, rest };
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });

/**
 * Follow request `id` until it ends. `onUpdate(update)` gets each status update
 * ({status, queue_position, waiting, progress, eta_s, error}); resolves with the last one
 * (status COMPLETED or FAILED, or "GONE"). Stops quietly when `signal` aborts.
 */
export async function follow(id, key, onUpdate, signal) {
  const ended = await streamEvents(id, key, onUpdate, signal);
  if (ended || signal.aborted) return ended;
  return pollStatus(id, key, onUpdate, signal);
}

async function streamEvents(id, key, onUpdate, signal) {
  let response;
  try {
    response = await fetch(`/v2/requests/${encodeURIComponent(id)}/events`, {
      headers: { "x-api-key": key, Accept: "text/event-stream" },
      cache: "no-store",
      signal,
    });
  } catch {
    return null;
  }
  if (!response.ok || !response.body) return null;
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return null; // closed before an end: poll instead
      buffer += value;
      const { events, rest } = parseEvents(buffer);
      buffer = rest;
      for (const event of events) {
        let data;
        try {
          data = JSON.parse(event.data);
        } catch {
          continue;
        }
        if (event.event === "gone") {
          const update = { status: "GONE", error: data.error };
          onUpdate(update);
          return update;
        }
        onUpdate(data);
        if (TERMINAL.has(data.status) && event.event !== "progress") return data;
      }
    }
  } catch {
    return null; // aborted, or the connection broke
  } finally {
    reader.cancel().catch(() => {});
  }
}

async function pollStatus(id, key, onUpdate, signal) {
  while (!signal.aborted) {
    let body = null;
    try {
      const response = await fetch(`/v2/requests/${encodeURIComponent(id)}/status`, {
        headers: { "x-api-key": key },
        cache: "no-store",
        signal,
      });
      body = await response.json();
      if (response.status === 404) body = { status: "GONE", error: body.error };
    } catch {
      body = null; // a blip: try again at the next tick
    }
    if (body && body.status) {
      onUpdate(body);
      if (TERMINAL.has(body.status) || body.status === "GONE") return body;
    }
    await sleep(POLL_MS, signal);
  }
  return null;
}
