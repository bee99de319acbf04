// The UI's client for Tally's /3.0 API: every call sends the signed-in key in the
// Authorization header and turns an error answer into an ApiError carrying Keen's
// {message, error_code}.

export class ApiError extends Error {
  constructor(status, message, errorCode) {
    super(message);
    this.status = status;
    this.error_code = errorCode;
  }
}

export class Api {
  constructor(project, key) {
    this.project = project;
    this.key = key;
  }

  url(path) {
    return `/3.0/projects/${encodeURIComponent(this.project)}${path}`;
  }

  async request(method, path, body) {
    let response;
    try {
      response = await fetch(this.url(path), {
        method,
        headers: {
          Authorization: this.key,
          ...(body === undefined ? {} : { "Content-Type": "application/json" }),
        },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      throw new ApiError(0, `Could not reach Tally: ${e.message}`, "NetworkError");
    }
    return readAnswer(response);
  }

  get(path) {
    return this.request("GET", path);
  }

  collections() {
    return this.get("/events");
  }

  query(analysis, params) {
    return this.request("POST", `/queries/${encodeURIComponent(analysis)}`, params);
  }

  savedQueries() {
    return this.get("/queries/saved");
  }

  saveQuery(name, definition) {
    return this.request("PUT", `/queries/saved/${encodeURIComponent(name)}`, definition);
  }

  savedResult(name) {
    return this.get(`/queries/saved/${encodeURIComponent(name)}/result`);
  }

  dashboards() {
    return this.get("/dashboards");
  }

  dashboard(name) {
    return this.get(`/dashboards/${encodeURIComponent(name)}`);
  }

  saveDashboard(name, definition) {
    return this.request("PUT", `/dashboards/${encodeURIComponent(name)}`, definition);
  }

  deleteDashboard(name) {
    return this.request("DELETE", `/dashboards/${encodeURIComponent(name)}`);
  }

  createKey(definition) {
    return this.request("POST", "/keys", definition);
  }

  /**
   * Follows a collection's live stream (server-sent events read with fetch, so the key travels
   * in a header, not the URL). Calls onEvent(eventObject) and onMissed(info); resolves when the
   * stream ends or `signal` aborts it.
   */
  async stream(collection, filters, { onOpen, onEvent, onMissed, signal }) {
    let path = `/events/${encodeURIComponent(collection)}/stream`;
    if (filters && filters.length) path += `?filters=${encodeURIComponent(JSON.stringify(filters))}`;
    let response;
    try {
      response = await fetch(this.url(path), {
        headers: { Authorization: this.key, Accept: "text/event-stream" },
        signal,
      });
    } catch (e) {
      if (signal && signal.aborted) return;
      throw new ApiError(0, `Could not reach Tally: ${e.message}`, "NetworkError");
    }
    if (!response.ok) await readAnswer(response);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const { type, data } = parseSse(block);
          if (data === null) continue;
          if (type === "open") onOpen && onOpen();
          else if (type === "missed") onMissed && onMissed(JSON.parse(data));
          else onEvent(JSON.parse(data));
        }
      }
    } catch (e) {
      if (signal && signal.aborted) return;
      throw new ApiError(0, `The live stream broke off: ${e.message}`, "NetworkError");
    } finally {
      // Whatever ended the loop, the connection (and the server's subscription) goes too.
      reader.cancel().catch(() => {});
    }
  }
}

function parseSse(block) {
  let type = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
  }
  return { type, data: data.length ? data.join("\n") : null };
}

async function readAnswer(response) {
  if (response.status === 204) return null;
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.message ? body.message : `HTTP ${response.status}`;
    const code = body && body.error_code ? body.error_code : `HTTP${response.status}`;
    throw new ApiError(response.status, message, code);
  }
  return body;
}

/** The server's metrics (Prometheus text), parsed into [{name, labels, value}]. */
export async function serverMetrics() {
  const response = await fetch("/metrics");
  if (!response.ok) throw new ApiError(response.status, "Could not read /metrics", `HTTP${response.status}`);
  const samples = [];
  for (const line of (await response.text()).split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const pair of (m[3] || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      labels[pair[1]] = pair[2];
    }
    samples.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return samples;
}
