// Tally's web UI: sign in with a project id and a key, explore (build, run, chart and save
// queries), dashboards of saved queries with embed links, the live event stream, and schema and
// health. One page; views are chosen by the URL's fragment (#/explorer, #/dashboards/NAME,
// #/live, #/schema, #/embed?...). The key is kept in sessionStorage only, and embed links carry
// their scoped key in the fragment, which browsers never send to a server.

import { Api, ApiError, serverMetrics } from "./api.js";
import { CHART_KINDS, drawChart, formatValue } from "./charts.js";
import { errorBox, h, options, replace, select } from "./dom.js";

const SESSION_KEY = "tally.session";

const ANALYSES = [
  "count",
  "count_unique",
  "sum",
  "average",
  "minimum",
  "maximum",
  "median",
  "percentile",
  "standard_deviation",
  "select_unique",
  "extraction",
  "funnel",
];
const TIMEFRAMES = [
  ["this_1_hours", "this hour"],
  ["this_24_hours", "last 24 hours"],
  ["this_7_days", "this 7 days"],
  ["this_30_days", "this 30 days"],
  ["previous_7_days", "previous 7 days"],
  ["this_1_years", "this year"],
  ["custom", "custom range…"],
];
const INTERVALS = [["", "no interval"], "minutely", "hourly", "daily", "weekly", "monthly", "yearly"];
const OPERATORS = ["eq", "ne", "lt", "lte", "gt", "gte", "exists", "in", "contains", "not_contains", "regex"];
const REFRESH = [
  ["0", "saved query"],
  ["14400", "cached, refreshed every 4 hours"],
  ["43200", "cached, every 12 hours"],
  ["86400", "cached, every 24 hours"],
];
const MAX_LIVE_EVENTS = 200;

const root = document.getElementById("app");
let session = loadSession();
// Each route() starts a new view: `view` counts them, so a view still awaiting the API after
// the person moved on can tell (`stale(token)`) and stop; `cleanups` stop what the current view
// runs (a live stream, a timer).
let view = 0;
let cleanups = [];
let schemaCache = null;

function stale(token) {
  return token !== view;
}

function onLeave(token, stop) {
  if (stale(token)) stop();
  else cleanups.push(stop);
}

function loadSession() {
  try {
    const raw = sessionStorage.getItem(SESSION_KEY);
    return raw ? JSON.parse(raw) : null;
  } catch {
    return null;
  }
}

function api() {
  return new Api(session.project, session.key);
}

async function collections(refresh = false) {
  if (!schemaCache || refresh) schemaCache = await api().collections();
  return schemaCache;
}

// ---------------------------------------------------------------------------------------------
// Routing

function route() {
  view += 1;
  for (const stop of cleanups.splice(0)) stop();
  const hash = location.hash.replace(/^#/, "") || "/explorer";
  const [path, query] = hash.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query || "");
  if (parts[0] === "embed") return embedView(params);
  if (!session) return signInView();
  const name = parts[0];
  const main = h("main", { id: "view" });
  replace(root, header(name), main);
  const render = {
    explorer: () => explorerView(main),
    dashboards: () => (parts[1] ? dashboardView(main, parts[1]) : dashboardsView(main)),
    live: () => liveView(main),
    schema: () => schemaView(main),
  }[name];
  (render || (() => explorerView(main)))();
}

function header(active) {
  const link = (view, label) =>
    h("a", { href: `#/${view}`, class: active === view ? "active" : null, "data-nav": view }, label);
  return h(
    "header",
    {},
    h("span", { class: "brand" }, "Tally"),
    h("nav", {}, link("explorer", "Explorer"), link("dashboards", "Dashboards"), link("live", "Live"), link("schema", "Schema & health")),
    h(
      "span",
      { class: "who" },
      h("span", { class: "muted", title: "project id" }, session.project),
      " ",
      h("span", { class: "badge" }, session.kind),
      " ",
      h(
        "button",
        {
          class: "link",
          onclick: () => {
            sessionStorage.removeItem(SESSION_KEY);
            session = null;
            schemaCache = null;
            location.hash = "#/explorer";
            route();
          },
        },
        "Sign out",
      ),
    ),
  );
}

// ---------------------------------------------------------------------------------------------
// Sign in

function signInView() {
  const project = h("input", { id: "project", name: "project", required: true, autocomplete: "off", placeholder: "24 hex digits" });
  const key = h("input", { id: "key", name: "key", type: "password", required: true, autocomplete: "off" });
  const message = h("div", { class: "message" });
  const form = h(
    "form",
    {
      class: "card signin",
      onsubmit: async (e) => {
        e.preventDefault();
        replace(message, h("p", { class: "muted" }, "Checking the key…"));
        try {
          const kind = await keyKind(new Api(project.value.trim(), key.value.trim()));
          session = { project: project.value.trim(), key: key.value.trim(), kind };
          sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
          schemaCache = null;
          route();
        } catch (err) {
          replace(message, errorBox(err));
        }
      },
    },
    h("h1", {}, "Sign in to Tally"),
    h("p", { class: "muted" }, "Use a project's master key, read key or an access key. It is kept in this browser tab only."),
    h("label", { for: "project" }, "Project id"),
    project,
    h("label", { for: "key" }, "Key"),
    key,
    h("button", { type: "submit", class: "primary" }, "Sign in"),
    message,
  );
  replace(root, h("main", { class: "center" }, form));
  project.focus();
}

/** What kind of key this is: "master", "read" or "access" (refuses keys that cannot read). */
async function keyKind(client) {
  try {
    await client.savedQueries();
    return "master";
  } catch (e) {
    if (!(e instanceof ApiError) || e.error_code !== "AdminOnlyEndpointError") throw e;
  }
  try {
    await client.collections();
    return "read";
  } catch (e) {
    if (e.error_code === "InsufficientPermissionsError") return "access";
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// Explorer

function parseScalar(text) {
  const t = text.trim();
  if (/^-?\d+(\.\d+)?([eE][-+]?\d+)?$/.test(t)) return Number(t);
  if (t === "true") return true;
  if (t === "false") return false;
  if (t === "null") return null;
  if (t.length >= 2 && t.startsWith('"') && t.endsWith('"')) return t.slice(1, -1);
  return text;
}

function filterValue(operator, text) {
  if (operator === "exists") return text.trim() !== "false";
  if (operator === "in") return text.split(",").map((v) => parseScalar(v.trim()));
  // Text operators take text, even when it looks like a number.
  if (operator === "contains" || operator === "not_contains" || operator === "regex") return text;
  return parseScalar(text);
}

/** The UTC instant (ISO 8601) of a wall-clock time ("2026-11-20T10:00") in an IANA zone. */
function zonedToUtc(local, zone) {
  const wall = Date.parse(`${local.length === 16 ? `${local}:00` : local}Z`);
  if (Number.isNaN(wall)) throw new ApiError(400, `'${local}' is not a date and time.`, "TimeframeDefinitionError");
  let offset;
  const offsetAt = (ms) => {
    let parts;
    try {
      parts = new Intl.DateTimeFormat("en-US", {
        timeZone: zone,
        hourCycle: "h23",
        year: "numeric",
        month: "2-digit",
        day: "2-digit",
        hour: "2-digit",
        minute: "2-digit",
        second: "2-digit",
      }).formatToParts(new Date(ms));
    } catch {
      throw new ApiError(400, `'${zone}' is not a time zone.`, "InvalidParameterError");
    }
    const p = Object.fromEntries(parts.map((x) => [x.type, x.value]));
    return Date.UTC(+p.year, +p.month - 1, +p.day, +p.hour, +p.minute, +p.second) - Math.floor(ms / 1000) * 1000;
  };
  offset = offsetAt(wall);
  offset = offsetAt(wall - offset); // again at the instant itself, for daylight-saving edges
  return new Date(wall - offset).toISOString();
}

async function explorerView(main) {
  const token = view;
  let schema = [];
  try {
    schema = await collections();
  } catch (e) {
    if (stale(token)) return;
    replace(main, errorBox(e), h("p", { class: "muted" }, "The Explorer needs a key that may read the schema."));
    return;
  }
  if (stale(token)) return;
  const names = schema.map((c) => c.name);
  const propertiesOf = (name) => {
    const c = schema.find((x) => x.name === name);
    return c ? Object.keys(c.properties).sort() : [];
  };

  const collection = select({ id: "collection", name: "collection" }, names.length ? names : [["", "(no collections yet)"]]);
  const analysis = select({ id: "analysis", name: "analysis" }, ANALYSES, "count");
  const target = select({ id: "target", name: "target" }, []);
  const percentile = h("input", { id: "percentile", type: "number", min: 0, max: 100, step: "any", value: "90" });
  const timeframe = select({ id: "timeframe" }, TIMEFRAMES, "this_7_days");
  const start = h("input", { id: "start", type: "datetime-local" });
  const end = h("input", { id: "end", type: "datetime-local" });
  const interval = select({ id: "interval" }, INTERVALS, "");
  const timezone = h("input", { id: "timezone", value: Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC", list: "zones" });
  const groupBy1 = select({ id: "group-by" }, []);
  const groupBy2 = select({ id: "group-by-2" }, []);
  const filterList = h("div", { class: "filters" });
  const stepList = h("div", { class: "steps" });
  const output = h("section", { class: "result", id: "result" });

  const propertyOptions = (name) => [["", "—"], ...propertiesOf(name)];
  const refreshProperties = () => {
    const props = propertyOptions(collection.value);
    for (const sel of [target, groupBy1, groupBy2]) replace(sel, options(props, sel.value));
  };
  const addFilter = (preset = {}) => {
    const property = h("input", { class: "f-property", list: "props", placeholder: "property", value: preset.property_name || "" });
    const operator = select({ class: "f-operator" }, OPERATORS, preset.operator || "eq");
    const value = h("input", { class: "f-value", placeholder: "value (a list: a, b, c)", value: preset.value || "" });
    const row = h("div", { class: "filter row" }, property, operator, value, h("button", { type: "button", class: "link", onclick: () => row.remove() }, "remove"));
    filterList.append(row);
  };
  const addStep = () => {
    const stepCollection = select({ class: "s-collection" }, names);
    const actor = h("input", { class: "s-actor", list: "props", placeholder: "actor property, e.g. user.id" });
    const row = h("div", { class: "step row" }, h("span", { class: "muted" }, "step"), stepCollection, actor, h("button", { type: "button", class: "link", onclick: () => row.remove() }, "remove"));
    stepList.append(row);
  };
  const propsList = h("datalist", { id: "props" });
  const refreshDatalist = () => replace(propsList, propertiesOf(collection.value).map((p) => h("option", { value: p })));
  const zones = h(
    "datalist",
    { id: "zones" },
    ["UTC", "America/New_York", "America/Los_Angeles", "Europe/London", "Europe/Berlin", "Asia/Tokyo", "Asia/Kolkata", "Australia/Sydney"].map((z) => h("option", { value: z })),
  );

  const showFields = () => {
    const a = analysis.value;
    document.querySelectorAll(".only-target").forEach((el) => (el.hidden = a === "count" || a === "extraction" || a === "funnel"));
    document.querySelectorAll(".only-percentile").forEach((el) => (el.hidden = a !== "percentile"));
    document.querySelectorAll(".only-funnel").forEach((el) => (el.hidden = a !== "funnel"));
    document.querySelectorAll(".not-funnel").forEach((el) => (el.hidden = a === "funnel"));
    document.querySelectorAll(".only-custom").forEach((el) => (el.hidden = timeframe.value !== "custom"));
  };

  /** The query's parameters as the API takes them. */
  const buildQuery = () => {
    const a = analysis.value;
    let tf = timeframe.value;
    if (tf === "custom") {
      if (!start.value || !end.value) throw new ApiError(400, "Give both ends of the custom range.", "TimeframeDefinitionError");
      const zone = timezone.value.trim() || "UTC";
      tf = { start: zonedToUtc(start.value, zone), end: zonedToUtc(end.value, zone) };
    }
    const params = { timeframe: tf, timezone: timezone.value.trim() || "UTC" };
    if (a === "funnel") {
      params.steps = [...stepList.querySelectorAll(".step")].map((row) => ({
        event_collection: row.querySelector(".s-collection").value,
        actor_property: row.querySelector(".s-actor").value.trim(),
        timeframe: tf,
        timezone: params.timezone,
      }));
      return params;
    }
    params.event_collection = collection.value;
    if (!(a === "count" || a === "extraction")) params.target_property = target.value;
    if (a === "percentile") params.percentile = Number(percentile.value);
    if (interval.value && a !== "extraction" && a !== "select_unique") params.interval = interval.value;
    const filters = [...filterList.querySelectorAll(".filter")]
      .map((row) => ({
        property_name: row.querySelector(".f-property").value.trim(),
        operator: row.querySelector(".f-operator").value,
        property_value: filterValue(row.querySelector(".f-operator").value, row.querySelector(".f-value").value),
      }))
      .filter((f) => f.property_name);
    if (filters.length) params.filters = filters;
    const groups = [groupBy1.value, groupBy2.value].filter(Boolean);
    if (groups.length && a !== "extraction") params.group_by = groups.length === 1 ? groups[0] : groups;
    if (a === "extraction") params.latest = 100;
    return params;
  };

  const run = async () => {
    replace(output, h("p", { class: "muted" }, "Running…"));
    const a = analysis.value;
    let params;
    try {
      params = buildQuery();
      const body = await api().query(a, params);
      showResult(output, a, params, body);
    } catch (e) {
      replace(output, errorBox(e), params ? curlBlock(a, params) : null);
    }
  };

  const saveName = h("input", { id: "save-name", placeholder: "name: letters, digits, - and _" });
  const saveRate = select({ id: "save-rate" }, REFRESH, "0");
  const saveMessage = h("span", { class: "message" });
  const save = async () => {
    replace(saveMessage);
    try {
      const query = { analysis_type: analysis.value, ...buildQuery() };
      await api().saveQuery(saveName.value.trim(), {
        query,
        refresh_rate: Number(saveRate.value),
        metadata: { display_name: saveName.value.trim() },
      });
      replace(saveMessage, h("span", { class: "ok" }, `Saved as ${saveName.value.trim()}.`));
    } catch (e) {
      replace(saveMessage, errorBox(e));
    }
  };

  collection.addEventListener("change", () => {
    refreshProperties();
    refreshDatalist();
  });
  analysis.addEventListener("change", showFields);
  timeframe.addEventListener("change", showFields);

  const field = (label, control, cls) => h("div", { class: `field ${cls || ""}` }, h("label", { for: control.id }, label), control);
  replace(
    main,
    h(
      "form",
      {
        class: "card explorer",
        // The API checks every parameter and says what is wrong; the browser's own checks
        // would stop some requests with less to say.
        novalidate: true,
        onsubmit: (e) => {
          e.preventDefault();
          run();
        },
      },
      propsList,
      zones,
      h(
        "div",
        { class: "grid-form" },
        field("Collection", collection, "not-funnel"),
        field("Analysis", analysis),
        field("Target property", target, "only-target not-funnel"),
        field("Percentile", percentile, "only-percentile"),
        field("Timeframe", timeframe),
        field("From", start, "only-custom"),
        field("To", end, "only-custom"),
        field("Interval", interval, "not-funnel"),
        field("Time zone", timezone),
        field("Group by", groupBy1, "not-funnel"),
        field("then by", groupBy2, "not-funnel"),
      ),
      h("div", { class: "not-funnel" }, h("h3", {}, "Filters"), filterList, h("button", { type: "button", class: "link", id: "add-filter", onclick: () => addFilter() }, "+ add filter")),
      h("div", { class: "only-funnel" }, h("h3", {}, "Funnel steps"), stepList, h("button", { type: "button", class: "link", id: "add-step", onclick: addStep }, "+ add step")),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary", id: "run" }, "Run")),
    ),
    output,
    session.kind === "master"
      ? h(
          "section",
          { class: "card save" },
          h("h3", {}, "Save this query"),
          h("div", { class: "row" }, saveName, saveRate, h("button", { type: "button", id: "save", onclick: save }, "Save"), saveMessage),
        )
      : h("p", { class: "muted" }, "Saving queries and dashboards needs the master key."),
  );
  refreshProperties();
  refreshDatalist();
  addStep();
  addStep();
  showFields();
}

function curlBlock(analysis, params) {
  const body = JSON.stringify(params).replace(/'/g, "'\\''");
  const url = `${location.origin}/3.0/projects/${session.project}/queries/${analysis}`;
  // The key is left out of the page (screenshots, screen shares): set TALLY_KEY to it.
  const text = `curl -X POST '${url}' \\\n  -H "Authorization: $TALLY_KEY" \\\n  -H 'Content-Type: application/json' \\\n  -d '${body}'`;
  return h("details", { class: "curl" }, h("summary", {}, "curl"), h("pre", { id: "curl" }, text));
}

function showResult(output, analysis, params, body) {
  const chart = h("div", { class: "chart-area", id: "chart" }, drawChart(analysis, body));
  const json = h("pre", { class: "json", id: "json", hidden: true }, JSON.stringify(body, null, 2));
  const chartTab = h("button", { type: "button", class: "tab active" }, "Chart");
  const jsonTab = h("button", { type: "button", class: "tab" }, "JSON");
  chartTab.addEventListener("click", () => {
    chart.hidden = false;
    json.hidden = true;
    chartTab.classList.add("active");
    jsonTab.classList.remove("active");
  });
  jsonTab.addEventListener("click", () => {
    chart.hidden = true;
    json.hidden = false;
    jsonTab.classList.add("active");
    chartTab.classList.remove("active");
  });
  replace(output, h("div", { class: "card" }, h("div", { class: "tabs" }, chartTab, jsonTab), chart, json, curlBlock(analysis, params)));
}

// ---------------------------------------------------------------------------------------------
// Dashboards

async function dashboardsView(main) {
  const token = view;
  replace(main, h("p", { class: "muted" }, "Loading dashboards…"));
  let list;
  try {
    list = await api().dashboards();
  } catch (e) {
    if (!stale(token)) replace(main, errorBox(e));
    return;
  }
  if (stale(token)) return;
  const name = h("input", { id: "new-dashboard", placeholder: "name: letters, digits, - and _" });
  const title = h("input", { id: "new-dashboard-title", placeholder: "title" });
  const message = h("div", { class: "message" });
  replace(
    main,
    h("h1", {}, "Dashboards"),
    list.length
      ? h("ul", { class: "dashboard-list" }, list.map((d) => h("li", {}, h("a", { href: `#/dashboards/${encodeURIComponent(d.dashboard_name)}` }, d.title || d.dashboard_name), " ", h("span", { class: "muted" }, `${d.tiles.length} charts`))))
      : h("p", { class: "muted" }, "No dashboards yet."),
    session.kind === "master"
      ? h(
          "form",
          {
            class: "card row",
            onsubmit: async (e) => {
              e.preventDefault();
              try {
                await api().saveDashboard(name.value.trim(), { title: title.value.trim(), tiles: [] });
                location.hash = `#/dashboards/${encodeURIComponent(name.value.trim())}`;
              } catch (err) {
                replace(message, errorBox(err));
              }
            },
          },
          name,
          title,
          h("button", { type: "submit", id: "create-dashboard" }, "New dashboard"),
          message,
        )
      : null,
  );
}

/** Draws one tile: the saved query's result through the viewer's key. */
async function drawTile(client, tile, body) {
  replace(body, h("p", { class: "muted" }, "Loading…"));
  try {
    const saved = await client.savedResult(tile.query_name);
    const analysis = saved.query ? saved.query.analysis_type : "";
    const answer = saved.result && typeof saved.result === "object" && !Array.isArray(saved.result) && "result" in saved.result ? saved.result : { result: saved.result };
    replace(body, drawChart(analysis, answer, tile.chart || "auto"));
  } catch (e) {
    replace(body, errorBox(e));
  }
}

function placeTile(el, tile) {
  el.style.gridColumn = `${tile.x + 1} / span ${tile.w}`;
  el.style.gridRow = `${tile.y + 1} / span ${tile.h}`;
}

function tileElement(client, tile, controls) {
  const body = h("div", { class: "tile-body" });
  const el = h("section", { class: "tile", "data-query": tile.query_name }, h("div", { class: "tile-head" }, h("h3", {}, tile.title || tile.query_name), controls || null), body);
  placeTile(el, tile);
  drawTile(client, tile, body);
  return el;
}

async function dashboardView(main, name) {
  const token = view;
  replace(main, h("p", { class: "muted" }, "Loading…"));
  let dashboard;
  let saved = [];
  try {
    dashboard = await api().dashboard(name);
    if (session.kind === "master") saved = await api().savedQueries();
  } catch (e) {
    if (!stale(token)) replace(main, errorBox(e), h("p", {}, h("a", { href: "#/dashboards" }, "All dashboards")));
    return;
  }
  if (stale(token)) return;
  const tiles = dashboard.tiles.map((t) => ({ ...t }));
  const grid = h("div", { class: "dashboard-grid", id: "grid" });
  const message = h("div", { class: "message" });
  const master = session.kind === "master";

  const move = (tile, dx, dy, dw, dh) => {
    tile.w = Math.min(12, Math.max(1, tile.w + dw));
    tile.h = Math.min(12, Math.max(1, tile.h + dh));
    tile.x = Math.min(12 - tile.w, Math.max(0, tile.x + dx));
    tile.y = Math.max(0, tile.y + dy);
    draw();
  };
  const controlsFor = (tile) =>
    h(
      "span",
      { class: "tile-controls" },
      [
        ["←", "move left", -1, 0, 0, 0],
        ["→", "move right", 1, 0, 0, 0],
        ["↑", "move up", 0, -1, 0, 0],
        ["↓", "move down", 0, 1, 0, 0],
        ["⇠", "narrower", 0, 0, -1, 0],
        ["⇢", "wider", 0, 0, 1, 0],
        ["⇡", "shorter", 0, 0, 0, -1],
        ["⇣", "taller", 0, 0, 0, 1],
      ].map(([label, title, dx, dy, dw, dh]) => h("button", { type: "button", class: "icon", title, onclick: () => move(tile, dx, dy, dw, dh) }, label)),
      h(
        "button",
        {
          type: "button",
          class: "icon",
          title: "remove",
          onclick: () => {
            tiles.splice(tiles.indexOf(tile), 1);
            draw();
          },
        },
        "✕",
      ),
    );
  // Each tile's element is built (and its result read) once; moving or resizing only places it.
  const elements = new Map();
  const draw = () => {
    for (const [tile, el] of elements) {
      if (!tiles.includes(tile)) {
        el.remove();
        elements.delete(tile);
      }
    }
    for (const tile of tiles) {
      if (!elements.has(tile)) {
        const el = tileElement(api(), tile, master ? controlsFor(tile) : null);
        elements.set(tile, el);
        grid.append(el);
      }
      placeTile(elements.get(tile), tile);
    }
  };

  const addQuery = select({ id: "add-tile-query" }, saved.map((q) => q.query_name));
  const addChart = select({ id: "add-tile-chart" }, CHART_KINDS, "auto");
  const editor = master
    ? h(
        "div",
        { class: "card row" },
        h("label", { for: "add-tile-query" }, "Add a chart of"),
        addQuery,
        addChart,
        h(
          "button",
          {
            type: "button",
            id: "add-tile",
            onclick: () => {
              if (!addQuery.value) return;
              const bottom = tiles.reduce((m, t) => Math.max(m, t.y + t.h), 0);
              tiles.push({ query_name: addQuery.value, x: 0, y: bottom, w: 6, h: 4, chart: addChart.value });
              draw();
            },
          },
          "Add",
        ),
        h(
          "button",
          {
            type: "button",
            class: "primary",
            id: "save-dashboard",
            onclick: async () => {
              try {
                await api().saveDashboard(name, { title: dashboard.title, tiles });
                replace(message, h("span", { class: "ok" }, "Dashboard saved."));
              } catch (e) {
                replace(message, errorBox(e));
              }
            },
          },
          "Save layout",
        ),
        message,
      )
    : null;

  replace(
    main,
    h("h1", {}, dashboard.title || name),
    editor,
    master ? embedForm(name, () => tiles) : null,
    grid,
  );
  draw();
}

/** Creates a scoped read key for a dashboard (its saved queries only, with an optional filter
 *  such as customer.id = acme) and shows the embed link. */
function embedForm(dashboardName, currentTiles) {
  const property = h("input", { id: "embed-property", list: "embed-props", placeholder: "property, e.g. customer.id (optional)" });
  const value = h("input", { id: "embed-value", placeholder: "value" });
  const out = h("div", { class: "embed-out" });
  return h(
    "details",
    { class: "card embed" },
    h("summary", {}, "Embed link"),
    h("p", { class: "muted" }, "Creates an access key that may read only this dashboard's saved queries, restricted to the events that match the filter, and a link that opens the dashboard with it."),
    h("div", { class: "row" }, property, h("span", {}, "="), value, h(
      "button",
      {
        type: "button",
        id: "create-embed",
        onclick: async () => {
          const names = [...new Set(currentTiles().map((t) => t.query_name))];
          // The value as typed: customer ids such as "02134" are text, and a number would
          // match nothing.
          const filters = property.value.trim() ? [{ property_name: property.value.trim(), operator: "eq", property_value: value.value }] : [];
          try {
            const key = await api().createKey({
              name: `embed ${dashboardName}${filters.length ? ` ${property.value.trim()}=${value.value}` : ""}`,
              is_active: true,
              permitted: ["saved_queries", "cached_queries"],
              options: {
                queries: filters.length ? { filters } : undefined,
                saved_queries: { allowed: names },
                cached_queries: { allowed: names },
              },
            });
            const link = `${location.origin}/#/embed?project=${encodeURIComponent(session.project)}&key=${encodeURIComponent(key.key)}&dashboard=${encodeURIComponent(dashboardName)}`;
            replace(out, h("input", { id: "embed-link", readonly: true, value: link }), " ", h("a", { href: link, target: "_blank", rel: "noopener" }, "open"));
          } catch (e) {
            replace(out, errorBox(e));
          }
        },
      },
      "Create link",
    )),
    out,
  );
}

// ---------------------------------------------------------------------------------------------
// Embedded dashboards and charts (no sign-in; the scoped key comes with the link)

async function embedView(params) {
  const client = new Api(params.get("project") || "", params.get("key") || "");
  const main = h("main", { class: "embedded" });
  replace(root, main);
  try {
    if (params.get("dashboard")) {
      const dashboard = await client.dashboard(params.get("dashboard"));
      const grid = h("div", { class: "dashboard-grid", id: "grid" }, dashboard.tiles.map((t) => tileElement(client, t)));
      replace(main, h("h1", {}, dashboard.title || dashboard.dashboard_name), grid);
    } else if (params.get("query")) {
      const tile = { query_name: params.get("query"), x: 0, y: 0, w: 12, h: 6, chart: params.get("chart") || "auto" };
      replace(main, h("div", { class: "dashboard-grid", id: "grid" }, tileElement(client, tile)));
    } else {
      throw new ApiError(400, "An embed link names a dashboard or a query.", "InvalidParameterError");
    }
  } catch (e) {
    replace(main, errorBox(e));
  }
}

// ---------------------------------------------------------------------------------------------
// Live events

async function liveView(main) {
  const token = view;
  let names = [];
  try {
    names = (await collections(true)).map((c) => c.name);
  } catch (e) {
    // A key without schema access can still watch a collection it names.
  }
  if (stale(token)) return;
  const collection = h("input", { id: "live-collection", list: "live-collections", placeholder: "collection", value: names[0] || "" });
  const filter = h("input", { id: "live-filter", placeholder: "show only events containing…" });
  const status = h("span", { class: "muted", id: "live-status" }, "not connected");
  const list = h("ol", { class: "live-events", id: "live-events" });
  const toggle = h("button", { type: "button", id: "live-pause" }, "Pause");
  const events = []; // newest first
  let paused = false;
  let heldBack = 0;
  let controller = null;

  const matches = (e) => !filter.value || JSON.stringify(e).toLowerCase().includes(filter.value.toLowerCase());
  const renderList = () =>
    replace(
      list,
      events.filter(matches).map((e) =>
        h(
          "li",
          { class: "live-event" },
          h("span", { class: "time" }, e.keen && e.keen.timestamp ? e.keen.timestamp : ""),
          h("pre", {}, JSON.stringify(e, null, 2)),
        ),
      ),
    );
  const connect = async () => {
    if (controller) controller.abort();
    // This stream's own controller: a stream replaced by a newer one must not report on it.
    const mine = new AbortController();
    controller = mine;
    const show = (...content) => mine.signal.aborted || replace(status, ...content);
    events.length = 0;
    renderList();
    if (!collection.value.trim()) return;
    show("connecting…");
    try {
      await api().stream(collection.value.trim(), [], {
        signal: mine.signal,
        onOpen: () => show(h("span", { class: "ok", id: "live-connected" }, `watching ${collection.value.trim()}`)),
        onEvent: (e) => {
          events.unshift(e);
          events.length = Math.min(events.length, MAX_LIVE_EVENTS);
          if (paused) {
            heldBack += 1;
            replace(toggle, `Resume (${heldBack} new)`);
          } else {
            renderList();
          }
        },
        onMissed: (m) => show(`watching ${collection.value.trim()} (some events were too many to show: ${JSON.stringify(m)})`),
      });
      show("the stream ended");
    } catch (e) {
      show(errorBox(e));
    }
  };
  toggle.addEventListener("click", () => {
    paused = !paused;
    heldBack = 0;
    replace(toggle, paused ? "Resume" : "Pause");
    if (!paused) renderList();
  });
  filter.addEventListener("input", renderList);
  collection.addEventListener("change", connect);
  onLeave(token, () => controller && controller.abort());
  replace(
    main,
    h("h1", {}, "Live events"),
    h(
      "div",
      { class: "card row" },
      h("datalist", { id: "live-collections" }, names.map((n) => h("option", { value: n }))),
      collection,
      h("button", { type: "button", id: "live-watch", onclick: connect }, "Watch"),
      toggle,
      h("button", { type: "button", onclick: () => { events.length = 0; renderList(); } }, "Clear"),
      filter,
      status,
    ),
    list,
  );
  connect();
}

// ---------------------------------------------------------------------------------------------
// Schema and health

async function schemaView(main) {
  const token = view;
  const schemaBox = h("section", { class: "card" }, h("p", { class: "muted" }, "Loading…"));
  const healthBox = h("section", { class: "card", id: "health" }, h("p", { class: "muted" }, "Reading metrics…"));
  replace(main, h("h1", {}, "Schema & health"), healthBox, schemaBox);

  collections(true)
    .then((list) =>
      replace(
        schemaBox,
        h("h2", {}, "Collections"),
        list.length
          ? list.map((c) =>
              h(
                "details",
                { class: "collection", "data-collection": c.name },
                h("summary", {}, h("strong", {}, c.name), " ", h("span", { class: "muted" }, `${formatValue(c.event_count)} events, ${Object.keys(c.properties).length} properties`)),
                h(
                  "table",
                  { class: "properties" },
                  h("thead", {}, h("tr", {}, h("th", {}, "property"), h("th", {}, "type"))),
                  h("tbody", {}, Object.entries(c.properties).map(([p, t]) => h("tr", {}, h("td", {}, p), h("td", {}, t)))),
                ),
              ),
            )
          : h("p", { class: "muted" }, "No events yet."),
      ),
    )
    .catch((e) => replace(schemaBox, errorBox(e)));

  let previous = null;
  const sum = (samples, name) => samples.filter((s) => s.name === name).reduce((a, s) => a + s.value, 0);
  const tick = async () => {
    try {
      const samples = await serverMetrics();
      const now = performance.now();
      const accepted = sum(samples, "tally_events_accepted_total");
      const processed = sum(samples, "tally_process_events_total");
      const rate = previous ? ((accepted - previous.accepted) * 1000) / (now - previous.at) : null;
      const processRate = previous ? ((processed - previous.processed) * 1000) / (now - previous.at) : null;
      previous = { accepted, processed, at: now };
      const rejected = samples.filter((s) => s.name === "tally_events_rejected_total" && s.value > 0);
      replace(
        healthBox,
        h("h2", {}, "Health"),
        h(
          "dl",
          { class: "stats" },
          h("dt", {}, "events accepted"),
          h("dd", { id: "accepted" }, formatValue(accepted)),
          h("dt", {}, "ingest rate"),
          h("dd", {}, rate === null ? "measuring…" : `${formatValue(rate)} events/s`),
          h("dt", {}, "processed rate"),
          h("dd", {}, processRate === null ? "measuring…" : `${formatValue(processRate)} events/s`),
          h("dt", {}, "process stage lag"),
          h("dd", { id: "lag" }, `${formatValue(sum(samples, "tally_log_consumer_lag_bytes"))} bytes of log`),
          h("dt", {}, "event log size"),
          h("dd", {}, `${formatValue(sum(samples, "tally_log_size_bytes"))} bytes`),
        ),
        h("h3", {}, "Rejected events by reason"),
        rejected.length
          ? h("table", { class: "properties", id: "rejected" }, h("tbody", {}, rejected.map((s) => h("tr", {}, h("td", {}, s.labels.reason || "?"), h("td", {}, formatValue(s.value))))))
          : h("p", { class: "muted" }, "None."),
        h("p", { class: "muted" }, "Server-wide figures, from /metrics."),
      );
    } catch (e) {
      replace(healthBox, errorBox(e));
    }
  };
  tick();
  const timer = setInterval(tick, 3000);
  onLeave(token, () => clearInterval(timer));
}

window.addEventListener("hashchange", route);
route();
