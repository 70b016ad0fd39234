// Server-sent events read with fetch(), not EventSource: EventSource cannot send the Authorization header the
// API key goes in, and a key in the URL would land in logs and history. The parser follows the HTML standard's
// event-stream rules for what Conclave sends: `event:` and `data:` fields, blank-line-terminated events, `:`
// comments (the server's pings). Both the dashboard's live stream and the chat's streamed answers use it.
"use strict";

// Calls onEvent(name, data) for each event of the response body, and onData() for every piece that arrives
// (pings included); resolves when the stream ends.
async function readEvents(response, onEvent, onData = () => {}) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let name = "message";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onData();
    buffer += value;
    let end;
    // A line ends at CR, LF or CRLF; a CR last in the buffer waits for the next piece, which may start with its LF.
    while ((end = buffer.search(/\r\n|\r(?!$)|\n/)) >= 0) {
      const line = buffer.slice(0, end);
      buffer = buffer.slice(end + (buffer.startsWith("\r\n", end) ? 2 : 1));
      if (line === "") {
        if (data.length) onEvent(name, data.join("\n"));
        name = "message";
        data = [];
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") name = text;
        else if (field === "data") data.push(text);
      }
    }
  }
}

const SILENCE_MS = 35000; // the server sends something every 0.5 s, a ping every 15 s at the least

// Follows `url` for as long as `signal` is not aborted, reconnecting after a drop (1 s, then up to 5 s apart), and
// after SILENCE_MS without a byte (a connection that died without closing: a laptop that slept, a network that
// changed). `headers()` gives the request's headers at each try; `state(s)` hears "connecting", "live" and "lost";
// `refused(response)` is called (and following stops) when the server answers 401.
async function follow(url, { headers, onEvent, state, refused, signal }) {
  let wait = 1000;
  while (!signal.aborted) {
    const attempt = new AbortController();
    const stop = () => attempt.abort();
    signal.addEventListener("abort", stop);
    let heard = Date.now();
    const watchdog = setInterval(() => { if (Date.now() - heard > SILENCE_MS) attempt.abort(); }, 5000);
    try {
      const response = await fetch(url, { headers: headers(), signal: attempt.signal, cache: "no-store" });
      if (response.status === 401) { refused(response); return; }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      state("live");
      wait = 1000;
      await readEvents(response, onEvent, () => { heard = Date.now(); });
    } catch (error) {
      if (signal.aborted) return;
    } finally {
      clearInterval(watchdog);
      signal.removeEventListener("abort", stop);
    }
    state("lost");
    await new Promise((resolve) => setTimeout(resolve, wait));
    wait = Math.min(wait * 2, 5000);
  }
}
