// Charts drawn as SVG, chosen to fit the answer: a line over time for intervals, bars for
// groups, a big number for a single value, a funnel for funnels and a table for extractions
// and lists. Labels are text nodes (see dom.js), so event values can never become markup.

import { h, s } from "./dom.js";

const PALETTE = ["#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6", "#dd4477", "#66aa00"];
const MAX_BARS = 40;
const MAX_SERIES = 8;
const MAX_TABLE_ROWS = 200;

export const CHART_KINDS = ["auto", "line", "bar", "number", "table", "funnel"];

const numberFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });

export function formatValue(v) {
  if (typeof v === "number") return numberFormat.format(v);
  if (v === null || v === undefined) return "–";
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

/** The chart that fits an answer: "number", "line", "bar", "funnel" or "table". */
export function chartKindFor(analysis, body) {
  const result = body ? body.result : undefined;
  if (analysis === "funnel") return "funnel";
  if (analysis === "extraction" || analysis === "select_unique") return "table";
  if (typeof result === "number" || result === null) return "number";
  if (Array.isArray(result)) {
    const first = result.find((r) => r !== null && typeof r === "object");
    if (first && "timeframe" in first) return "line";
    if (first && "result" in first) return "bar";
    return "table";
  }
  return "table";
}

/** Draws `body` (a query answer) as `kind` ("auto": chartKindFor). */
export function drawChart(analysis, body, kind = "auto") {
  const chosen = kind === "auto" ? chartKindFor(analysis, body) : kind;
  try {
    switch (chosen) {
      case "number":
        return bigNumber(body.result);
      case "line":
        return lineChart(body.result);
      case "bar":
        return barChart(body.result);
      case "funnel":
        return funnelChart(body);
      default:
        return table(body.result);
    }
  } catch (e) {
    // A result the chosen chart cannot draw is shown as a table rather than not at all.
    return h("div", {}, h("p", { class: "muted" }, `This answer cannot be drawn as a ${chosen} chart.`), table(body.result));
  }
}

function groupLabel(entry) {
  return Object.entries(entry)
    .filter(([k]) => k !== "result")
    .map(([, v]) => formatValue(v))
    .join(" / ");
}

function bigNumber(value) {
  return h("div", { class: "chart big-number", "data-chart": "number" }, formatValue(value));
}

function barChart(rows) {
  if (!Array.isArray(rows)) throw new Error("not a list of groups");
  const bars = rows
    .map((r) => ({ label: groupLabel(r), value: typeof r.result === "number" ? r.result : 0 }))
    .sort((a, b) => b.value - a.value);
  const shown = bars.slice(0, MAX_BARS);
  const max = shown.reduce((a, b) => Math.max(a, Math.abs(b.value)), 1e-9);
  const rowHeight = 26;
  const width = 640;
  const labelWidth = 180;
  const height = shown.length * rowHeight + 8;
  const svg = s("svg", {
    class: "chart bar-chart",
    "data-chart": "bar",
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": "bar chart",
  });
  shown.forEach((bar, i) => {
    const y = 4 + i * rowHeight;
    const barWidth = ((width - labelWidth - 90) * Math.abs(bar.value)) / max;
    svg.append(
      s("text", { x: labelWidth - 8, y: y + 17, "text-anchor": "end", class: "label" }, truncate(bar.label, 28)),
      s(
        "rect",
        {
          class: "bar",
          x: labelWidth,
          y: y + 3,
          width: Math.max(1, barWidth),
          height: rowHeight - 8,
          fill: PALETTE[0],
          "data-label": bar.label,
          "data-value": bar.value,
        },
        s("title", {}, `${bar.label}: ${formatValue(bar.value)}`),
      ),
      s("text", { x: labelWidth + barWidth + 6, y: y + 17, class: "value" }, formatValue(bar.value)),
    );
  });
  const more = bars.length - shown.length;
  return h("div", { class: "chart-wrap" }, svg, more > 0 ? h("p", { class: "muted" }, `and ${more} more groups`) : null);
}

function lineChart(points) {
  if (!Array.isArray(points)) throw new Error("not a series");
  // One series for plain values; one per group when each interval holds groups.
  const series = new Map();
  points.forEach((p, i) => {
    if (Array.isArray(p.value)) {
      for (const g of p.value) {
        const label = groupLabel(g);
        if (!series.has(label)) series.set(label, new Array(points.length).fill(0));
        series.get(label)[i] = typeof g.result === "number" ? g.result : 0;
      }
    } else if (p.value !== null && typeof p.value === "object") {
      // multi_analysis: one series per labelled analysis.
      for (const [label, v] of Object.entries(p.value)) {
        if (!series.has(label)) series.set(label, new Array(points.length).fill(0));
        series.get(label)[i] = typeof v === "number" ? v : 0;
      }
    } else {
      if (!series.has("value")) series.set("value", new Array(points.length).fill(0));
      series.get("value")[i] = typeof p.value === "number" ? p.value : 0;
    }
  });
  const ranked = [...series.entries()]
    .sort((a, b) => b[1].reduce((x, y) => x + y, 0) - a[1].reduce((x, y) => x + y, 0))
    .slice(0, MAX_SERIES);
  const width = 640;
  const height = 260;
  const m = { left: 56, right: 12, top: 12, bottom: 34 };
  // reduce, not Math.max(...): a long series would overflow the call's arguments.
  const all = ranked.flatMap(([, v]) => v);
  const max = all.reduce((a, b) => Math.max(a, b), 1e-9);
  const min = all.reduce((a, b) => Math.min(a, b), 0);
  const x = (i) => m.left + (points.length <= 1 ? 0 : (i * (width - m.left - m.right)) / (points.length - 1));
  const y = (v) => m.top + ((max - v) * (height - m.top - m.bottom)) / (max - min || 1);
  const svg = s("svg", {
    class: "chart line-chart",
    "data-chart": "line",
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": "line chart",
  });
  for (let t = 0; t <= 4; t++) {
    const v = min + ((max - min) * t) / 4;
    svg.append(
      s("line", { x1: m.left, x2: width - m.right, y1: y(v), y2: y(v), class: "grid" }),
      s("text", { x: m.left - 6, y: y(v) + 4, "text-anchor": "end", class: "label" }, formatValue(v)),
    );
  }
  const ticks = points.length <= 1 ? [0] : [0, Math.floor((points.length - 1) / 2), points.length - 1];
  for (const i of new Set(ticks)) {
    const start = points[i] && points[i].timeframe ? points[i].timeframe.start : "";
    svg.append(s("text", { x: x(i), y: height - 10, "text-anchor": "middle", class: "label" }, shortTime(start)));
  }
  ranked.forEach(([label, values], k) => {
    const color = PALETTE[k % PALETTE.length];
    svg.append(
      s("polyline", {
        class: "series",
        fill: "none",
        stroke: color,
        "stroke-width": 2,
        points: values.map((v, i) => `${x(i)},${y(v)}`).join(" "),
        "data-label": label,
      }),
    );
    // Dots (with their tooltips) only where there are few enough points to point at.
    if (points.length > 120) return;
    values.forEach((v, i) => {
      const start = points[i].timeframe ? points[i].timeframe.start : "";
      svg.append(s("circle", { cx: x(i), cy: y(v), r: 3, fill: color, class: "point" }, s("title", {}, `${label} ${start}: ${formatValue(v)}`)));
    });
  });
  const legend =
    ranked.length > 1 || (ranked.length === 1 && ranked[0][0] !== "value")
      ? h(
          "ul",
          { class: "legend" },
          ranked.map(([label], k) => h("li", {}, h("span", { class: `swatch c${k % PALETTE.length}` }), label)),
        )
      : null;
  return h("div", { class: "chart-wrap" }, svg, legend);
}

function funnelChart(body) {
  const counts = Array.isArray(body.result) ? body.result : [];
  const steps = Array.isArray(body.steps) ? body.steps : [];
  const first = counts[0] || 0;
  const width = 640;
  const rowHeight = 40;
  const svg = s("svg", {
    class: "chart funnel-chart",
    "data-chart": "funnel",
    viewBox: `0 0 ${width} ${counts.length * rowHeight + 8}`,
    role: "img",
    "aria-label": "funnel",
  });
  counts.forEach((count, i) => {
    const share = first ? count / first : 0;
    const barWidth = Math.max(2, (width - 220) * share);
    const y = 4 + i * rowHeight;
    const step = steps[i] || {};
    svg.append(
      s("rect", { class: "bar step", x: (width - 220 - barWidth) / 2, y, width: barWidth, height: rowHeight - 8, fill: PALETTE[0], "data-value": count }),
      s("text", { x: width - 212, y: y + 14, class: "label" }, `${i + 1}. ${truncate(String(step.event_collection || ""), 22)}`),
      s("text", { x: width - 212, y: y + 29, class: "value" }, `${formatValue(count)} (${(share * 100).toFixed(1)}%)`),
    );
  });
  return svg;
}

function table(result) {
  const rows = Array.isArray(result) ? result : result && typeof result === "object" ? Object.entries(result).map(([k, v]) => ({ name: k, result: v })) : [result];
  const objects = rows.every((r) => r !== null && typeof r === "object" && !Array.isArray(r));
  const shown = rows.slice(0, MAX_TABLE_ROWS);
  let head;
  let body;
  if (objects) {
    const columns = [];
    for (const r of shown) for (const c of Object.keys(flatten(r))) if (!columns.includes(c)) columns.push(c);
    head = h("tr", {}, columns.map((c) => h("th", {}, c)));
    body = shown.map((r) => {
      const flat = flatten(r);
      return h("tr", {}, columns.map((c) => h("td", {}, formatValue(flat[c]))));
    });
  } else {
    head = h("tr", {}, h("th", {}, "value"));
    body = shown.map((r) => h("tr", {}, h("td", {}, formatValue(r))));
  }
  return h(
    "div",
    { class: "chart-wrap table-wrap" },
    h("table", { class: "chart result-table", "data-chart": "table" }, h("thead", {}, head), h("tbody", {}, body)),
    rows.length > shown.length ? h("p", { class: "muted" }, `showing ${shown.length} of ${rows.length} rows`) : null,
  );
}

/** An object's leaves by dotted path (nested properties become columns). */
export function flatten(value, prefix = "", out = {}) {
  if (value !== null && typeof value === "object" && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value)) flatten(v, prefix ? `${prefix}.${k}` : k, out);
  } else {
    out[prefix || "value"] = value;
  }
  return out;
}

function truncate(text, n) {
  return text.length > n ? `${text.slice(0, n - 1)}…` : text;
}

function shortTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}
