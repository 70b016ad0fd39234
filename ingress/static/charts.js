// The throughput charts: per model, tokens per second, time to first token, and requests in flight and queued,
// over the last two minutes (the server's throughput events, ingress/live.py). Kept outside Alpine's reactive
// state: uPlot objects and their arrays change every half second and need no proxies.
"use strict";

const Charts = (() => {
  const KEEP = 240; // samples: two minutes at the server's 0.5 s tick
  const series = new Map(); // model -> {time, tokens, ttft, inflight, queued}
  const plots = new Map(); // `${model}/${kind}` -> uPlot
  const KINDS = {
    tokens: { title: "tokens/s", lines: [["tokens", "tokens/s", "#1f5fbf"]] },
    ttft: { title: "TTFT (s)", lines: [["ttft", "TTFT s", "#8a4f00"]] },
    jobs: { title: "requests", lines: [["inflight", "in flight", "#1d7a3a"], ["queued", "queued", "#a3262a"]] },
  };

  function data(model) {
    if (!series.has(model)) series.set(model, { time: [], tokens: [], ttft: [], inflight: [], queued: [] });
    return series.get(model);
  }

  function columns(model, kind) {
    const d = data(model);
    return [d.time, ...KINDS[kind].lines.map(([key]) => d[key])];
  }

  function add(model, sample) {
    const d = data(model);
    d.time.push(sample.time);
    d.tokens.push(sample.tokens_per_s);
    d.ttft.push(sample.ttft_s);
    d.inflight.push(sample.in_flight);
    d.queued.push(sample.queued);
    if (d.time.length > KEEP) for (const key of Object.keys(d)) d[key].shift();
    for (const kind of Object.keys(KINDS)) plots.get(`${model}/${kind}`)?.setData(columns(model, kind));
  }

  function make(element, model, kind) {
    const spec = KINDS[kind];
    const width = Math.max(200, element.clientWidth || 260);
    const plot = new uPlot({
      width, height: 110, title: spec.title, legend: { show: kind === "jobs" },
      // Always the last two minutes (a lone first sample would otherwise span years), from zero up.
      scales: { x: { time: true, range: (u, min, max) => [max - KEEP / 2, max] },
        y: { range: (u, min, max) => [0, Math.max(1, max || 0)] } },
      axes: [{ size: 24, space: 60 }, { size: 40 }],
      series: [{}, ...spec.lines.map(([, label, stroke]) => ({ label, stroke, width: 2, spanGaps: false }))],
    }, columns(model, kind), element);
    plots.get(`${model}/${kind}`)?.destroy();
    plots.set(`${model}/${kind}`, plot);
  }

  function reset(history) {
    series.clear();
    for (const [model, samples] of Object.entries(history || {})) for (const s of samples) add(model, s);
  }

  return { add, make, reset };
})();
