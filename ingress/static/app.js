// The dashboard: one Alpine.js component. What it shows arrives on one live stream (stream.js: follow, of
// /v1/cluster/events) and from the /v1 routes any OpenAI client uses; the API key, when the server wants one,
// stays in this tab's session storage. Everything received is put into the page as text (x-text,
// textContent), never as HTML.
"use strict";

const KEY_ITEM = "conclave-api-key";
const KEY_CHARACTERS = /^(?=.{16,}$)[A-Za-z0-9\-._~+\/]+=*$/;
const CONVERSATIONS_ITEM = "conclave-conversations";
const VIEWS = [
  { id: "cluster", label: "Cluster" }, { id: "models", label: "Models" },
  { id: "chat", label: "Chat" }, { id: "audit", label: "Audit" },
];

function dashboard() {
  return {
    views: VIEWS,
    view: "cluster",
    key: sessionStorage.getItem(KEY_ITEM) || "",
    keyDraft: "",
    keyNeeded: false,
    keyError: "",
    authorised: false,
    live: "connecting",
    unreachable: "",
    natsDown: false,
    auditReload: null,
    notice: "",
    nodes: {},
    links: [],
    controller: null,
    isCluster: false,
    models: [],
    throughput: {},
    placement: null,
    auditEnabled: false,
    auditError: "",
    records: [],
    record: null,
    verdict: null,
    verifying: false,
    chatModels: [],
    chatModel: "",
    system: "",
    temperature: 0.7,
    maxTokens: 512,
    draft: "",
    busy: false,
    conversations: [],
    currentId: null,
    following: null,
    answering: null,

    async init() {
      this.route();
      window.addEventListener("hashchange", () => this.route());
      try {
        this.conversations = JSON.parse(localStorage.getItem(CONVERSATIONS_ITEM) || "[]") || [];
      } catch (error) {
        this.conversations = [];  // not ours, or damaged: started again
      }
      if (!this.conversations.length) this.newConversation();
      this.currentId = this.conversations[0].id;
      await this.enter();
    },

    route() {
      const asked = location.hash.slice(1);
      this.view = VIEWS.some((v) => v.id === asked) ? asked : "cluster";
      if (this.view === "audit" && this.authorised) this.loadRecords();
    },

    headers(extra = {}) {
      return this.key ? { ...extra, Authorization: `Bearer ${this.key}` } : extra;
    },

    // The page shows nothing until the server accepts the key (or wants none); a server that cannot answer now
    // is asked again every few seconds, and the page says why it waits.
    async enter() {
      let response;
      try {
        response = await fetch("/v1/models", { headers: this.headers() });
        if (response.status === 401) {
          this.unreachable = "";
          this.lock(this.key ? (await apiError(response)) : "");
          return;
        }
        if (!response.ok) throw new Error(await apiError(response));
        this.setChatModels((await response.json()).data.map((m) => m.id));
      } catch (error) {
        this.unreachable = `The server cannot answer right now (${error.message}); trying again…`;
        setTimeout(() => this.enter(), 3000);
        return;
      }
      this.unreachable = "";
      this.keyNeeded = false;
      this.authorised = true;
      this.follow();
      if (this.view === "audit") this.loadRecords();
    },

    lock(message) {
      this.following?.abort();
      this.authorised = false;
      this.keyNeeded = true;
      this.keyError = message;
      // Nothing a key showed stays behind it (an opened record holds a whole prompt and answer).
      this.nodes = {};
      this.models = [];
      this.records = [];
      this.record = null;
      this.verdict = null;
      this.placement = null;
      this.links = [];
      this.controller = null;
      this.throughput = {};
    },

    async unlock() {
      const key = this.keyDraft.trim();
      this.keyDraft = "";
      // A key is a bearer token's characters (README, API keys): one pasted with an invisible or typographic
      // character could not even be sent (fetch throws), and the page would wait for a server that is there.
      if (!KEY_CHARACTERS.test(key)) {
        this.lock("That is not an API key: a key is 16 or more of A-Z a-z 0-9 - . _ ~ + / (check for a stray character).");
        return;
      }
      this.key = key;
      sessionStorage.setItem(KEY_ITEM, this.key);
      await this.enter();
    },

    forgetKey() {
      sessionStorage.removeItem(KEY_ITEM);
      this.key = "";
      this.lock("");
    },

    follow() {
      this.following?.abort();
      this.following = new AbortController();
      follow("/v1/cluster/events", {
        headers: () => this.headers(),
        signal: this.following.signal,
        state: (s) => { this.live = s; },
        refused: async (response) => this.lock(await apiError(response)),
        onEvent: (name, data) => this.hear(name, JSON.parse(data)),
      });
    },

    hear(name, data) {
      if (name === "snapshot") {
        this.nodes = Object.fromEntries(data.nodes.map((n) => [n.facts.id, n]));
        Charts.reset(data.history);
        this.natsDown = !data.nats;
        this.cluster(data);
      } else if (name === "node") {
        this.nodes[data.facts.id] = data;
      } else if (name === "forget") {
        delete this.nodes[data.id];
      } else if (name === "cluster") {
        this.cluster(data);
      } else if (name === "throughput") {
        this.throughput = data.models;
        for (const [model, sample] of Object.entries(data.models)) Charts.add(model, { time: data.time, ...sample });
      } else if (name === "nats") {
        this.natsDown = !data.connected;
      } else if (name === "audit" && this.view === "audit") {
        // Records may come many a second: the list is read again at most every 2 s.
        this.auditReload ??= setTimeout(() => { this.auditReload = null; this.loadRecords(); }, 2000);
      }
    },

    cluster(data) {
      this.links = data.links;
      this.controller = data.controller;
      this.isCluster = data.cluster;
      this.models = data.models;
      this.auditEnabled = data.audit;
      this.setChatModels(data.models.filter((m) => m.status !== "unloading").map((m) => m.id));
    },

    setChatModels(ids) {
      this.chatModels = ids;
      if (!ids.includes(this.chatModel)) this.chatModel = ids[0] || "";
    },

    // --- cluster ---
    nodeList() {
      return Object.values(this.nodes).sort((a, b) => (a.facts.host + a.facts.id).localeCompare(b.facts.host + b.facts.id));
    },
    nodeSummary() {
      const all = Object.values(this.nodes);
      const lost = all.filter((n) => n.state === "lost").length;
      return `${all.length} node${all.length === 1 ? "" : "s"}` + (lost ? `, ${lost} lost` : "");
    },
    nodeName(id) {
      return this.nodes[id]?.facts.host ? `${this.nodes[id].facts.host} (${id.slice(0, 6)})` : id;
    },
    ago(node) {
      return `${Math.round(node.last_seen_s)} s ago`;
    },
    networkKinds(node) {
      return [...new Set(node.interfaces.filter((i) => i.up && ["ethernet", "wifi", "thunderbolt"].includes(i.kind))
        .map((i) => i.kind))].join(" + ");
    },
    network(node) {
      const kinds = node.interfaces.filter((i) => i.up && i.kind !== "loopback" && i.kind !== "other")
        .map((i) => i.kind + (i.speed_mbps ? ` ${i.speed_mbps >= 1000 ? i.speed_mbps / 1000 + " Gb/s" : i.speed_mbps + " Mb/s"}` : ""));
      if (node.rdma_devices.length) kinds.push(`RDMA ×${node.rdma_devices.length}`);
      return [...new Set(kinds)].join(", ") || "—";
    },

    drawTopology(svg) {
      const nodes = this.nodeList();
      const links = this.links;
      const NS = "http://www.w3.org/2000/svg";
      const size = 320, middle = size / 2, radius = nodes.length > 1 ? 115 : 0;
      svg.setAttribute("viewBox", `0 0 ${size} ${size}`);
      svg.replaceChildren();
      const at = new Map(nodes.map((n, i) => {
        const angle = (2 * Math.PI * i) / Math.max(1, nodes.length) - Math.PI / 2;
        return [n.facts.id, [middle + radius * Math.cos(angle), middle + radius * Math.sin(angle)]];
      }));
      const make = (tag, attributes, text) => {
        const element = document.createElementNS(NS, tag);
        for (const [k, v] of Object.entries(attributes)) element.setAttribute(k, v);
        if (text != null) element.textContent = text;
        svg.appendChild(element);
        return element;
      };
      if (nodes.length > 1) {
        for (const n of nodes) {  // the way each node reaches the broker: its network interfaces' kinds
          const [x, y] = at.get(n.facts.id);
          make("line", { x1: middle, y1: middle, x2: x, y2: y, class: `fabric ${n.state}` });
          make("text", { x: (middle + x) / 2 + 4, y: (middle + y) / 2, class: "label small" }, this.networkKinds(n));
        }
        make("circle", { cx: middle, cy: middle, r: 22, class: "broker" });
        make("text", { x: middle, y: middle + 4, "text-anchor": "middle", class: "label" }, "NATS");
      }
      for (const link of links) {
        if (!at.has(link.a) || !at.has(link.b)) continue;
        const [x1, y1] = at.get(link.a), [x2, y2] = at.get(link.b);
        make("line", { x1, y1, x2, y2, class: `link ${link.kind}` });
        make("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 4, "text-anchor": "middle", class: "label small" }, link.kind);
      }
      for (const n of nodes) {
        const [x, y] = at.get(n.facts.id);
        make("circle", { cx: x, cy: y, r: 30, class: `node ${n.state}` });
        make("text", { x, y: y - 2, "text-anchor": "middle", class: "label" }, (n.facts.host || n.facts.id).slice(0, 14));
        make("text", { x, y: y + 12, "text-anchor": "middle", class: "label small" },
          n.state === "lost" ? "lost" : `${gb(n.memory_used)} / ${gb(n.facts.memory_total)}`);
      }
    },

    // --- models ---
    statusText(model) {
      const instance = model.instance;
      if (model.status === "loading" && model.downloads.length) return "loading: fetching files";
      if (model.status === "loading" && instance) return `loading: ${instance.state}`;
      if (model.status === "loaded" && instance?.layout) return `loaded (${instance.layout})`;
      return model.status;
    },
    rankText(instance, i) {
      const layers = instance.layers[i];
      const memory = instance.memory[i];
      return `${this.nodeName(instance.nodes[i])}` + (layers ? `: layers ${layerRange(layers)}` : "")
        + (memory ? `, ${gb(memory)}` : "");
    },
    progressText(d) {
      if (d.error) return `failed: ${d.error}`;
      const part = d.total ? `${(100 * d.done / d.total).toFixed(0)}% of ${gb(d.total)}` : gb(d.done);
      const speed = d.bytes_per_s ? `, ${(d.bytes_per_s / 1e6).toFixed(1)} MB/s` : "";
      const left = d.bytes_per_s && d.total ? `, ${Math.ceil((d.total - d.done) / d.bytes_per_s)} s left` : "";
      return part + speed + left;
    },
    async preview(model) {
      this.placement = null;
      const answer = await this.call("/v1/cluster/placement", "POST", { model });
      if (answer) this.placement = answer;
    },
    async load(model) {
      const answer = await this.call("/v1/cluster/instances", "POST", { model });
      if (answer) this.notice = `${model}: asked to load; its status follows below.`;
    },
    async unload(model) {
      const answer = await this.call(`/v1/cluster/instances/${encodeURIComponent(model)}`, "DELETE");
      if (answer) this.notice = `${model}: asked to unload.`;
    },
    // A /v1 call whose answer is JSON; an error is shown as the API's own message.
    async call(url, method, body) {
      this.notice = "";
      try {
        const response = await fetch(url, {
          method, headers: this.headers(body ? { "Content-Type": "application/json" } : {}),
          body: body ? JSON.stringify(body) : undefined,
        });
        if (!response.ok) {
          this.notice = await apiError(response);
          return null;
        }
        return await response.json();
      } catch (error) {
        this.notice = `The server cannot be reached (${error.message}).`;
        return null;
      }
    },
    servedModels() {
      return Object.keys(this.throughput).sort();
    },
    throughputText(model) {
      const t = this.throughput[model];
      if (!t) return "";
      return `${t.tokens_per_s} tok/s · TTFT ${t.ttft_s == null ? "—" : t.ttft_s.toFixed(2) + " s"} · `
        + `${t.in_flight} in flight · ${t.queued} queued`;
    },
    makeChart(element, model, kind) {
      this.$nextTick(() => Charts.make(element, model, kind));
    },

    // --- chat ---
    current() {
      return this.conversations.find((c) => c.id === this.currentId) || this.conversations[0];
    },
    newConversation() {
      const conversation = { id: crypto.randomUUID(), title: "", messages: [] };
      this.conversations.unshift(conversation);
      this.currentId = conversation.id;
      this.save();
    },
    deleteConversation(id) {
      this.conversations = this.conversations.filter((c) => c.id !== id);
      if (!this.conversations.length) this.newConversation();
      if (!this.conversations.some((c) => c.id === this.currentId)) this.currentId = this.conversations[0].id;
      this.save();
    },
    save() {
      localStorage.setItem(CONVERSATIONS_ITEM, JSON.stringify(this.conversations));
    },
    async send() {
      const text = this.draft.trim();
      if (!text || this.busy || !this.chatModel) return;
      const conversation = this.current();
      conversation.title ||= text.slice(0, 40);
      conversation.messages.push({ role: "user", content: text });
      // A turn that failed before any text is not sent back as context.
      const history = conversation.messages.filter((m) => m.content).map(({ role, content }) => ({ role, content }));
      conversation.messages.push({ role: "assistant", content: "", error: "", stats: "" });
      const answer = conversation.messages[conversation.messages.length - 1];
      this.draft = "";
      this.busy = true;
      this.answering = new AbortController();
      const messages = this.system.trim() ? [{ role: "system", content: this.system.trim() }, ...history] : history;
      const started = performance.now();
      let first = null, usage = null;
      try {
        const response = await fetch("/v1/chat/completions", {
          method: "POST", signal: this.answering.signal,
          headers: this.headers({ "Content-Type": "application/json" }),
          body: JSON.stringify({
            model: this.chatModel, messages, stream: true, stream_options: { include_usage: true },
            temperature: Number(this.temperature), max_tokens: Number(this.maxTokens),
          }),
        });
        if (!response.ok) {
          answer.error = await apiError(response);
        } else {
          await readEvents(response, (name, data) => {
            if (data === "[DONE]") return;
            const chunk = JSON.parse(data);
            if (chunk.error) { answer.error = chunk.error.message; return; }
            const delta = chunk.choices?.[0]?.delta?.content;
            if (delta) {
              first ??= performance.now();
              answer.content += delta;
            }
            if (chunk.usage) usage = chunk.usage;
          });
        }
      } catch (error) {
        if (error.name === "AbortError") answer.error = "Stopped.";
        else answer.error = `The server cannot be reached (${error.message}).`;
      }
      const ended = performance.now();
      if (first !== null) {
        const tokens = usage?.completion_tokens;
        const rate = tokens > 1 && ended > first ? ((tokens - 1) / ((ended - first) / 1000)).toFixed(1) : null;
        answer.stats = `TTFT ${((first - started) / 1000).toFixed(2)} s` + (rate ? ` · ${rate} tok/s` : "")
          + (tokens ? ` · ${tokens} tokens` : "");
      }
      this.busy = false;
      this.answering = null;
      this.save();
    },
    stop() {
      this.answering?.abort();
    },

    // --- audit ---
    async loadRecords() {
      try {
        const response = await fetch("/v1/audit/records?limit=50", { headers: this.headers() });
        if (!response.ok) {
          this.auditError = await apiError(response);
          return;
        }
        this.auditError = "";
        this.records = (await response.json()).data;
      } catch (error) {
        this.auditError = `The server cannot be reached (${error.message}).`;
      }
    },
    async showRecord(seq) {
      const answer = await this.call(`/v1/audit/records/${seq}`, "GET");
      if (answer) this.record = answer;
    },
    async verify() {
      this.verifying = true;
      this.verdict = null;
      const answer = await this.call("/v1/audit/verify", "POST");
      if (answer) this.verdict = answer;
      this.verifying = false;
    },
    when(t) {
      return new Date(t * 1000).toLocaleString();
    },

    // --- formatting ---
    gb, pct, layerRange,
    percent(value) {
      return value == null ? "—" : `${value.toFixed(0)}%`;
    },
  };
}

function gb(bytes) {
  if (bytes == null) return "—";
  return bytes >= 1e9 ? `${(bytes / 1e9).toFixed(2)} GB` : `${(bytes / 1e6).toFixed(0)} MB`;
}

// [start, end) as the layers it names: "0–29" (30 layers)
function layerRange([start, end]) {
  return end - start === 1 ? `${start}` : `${start}–${end - 1}`;
}

function pct(part, whole) {
  return whole ? Math.min(100, (100 * part) / whole).toFixed(1) : 0;
}

// OpenAI's error object's message, or what can be said without one.
async function apiError(response) {
  try {
    const body = await response.json();
    if (body?.error?.message) return body.error.message;
  } catch (error) { /* not JSON */ }
  return `HTTP ${response.status} ${response.statusText}`;
}

document.addEventListener("alpine:init", () => Alpine.data("dashboard", dashboard));
