// Server-sent events read with fetch(), not EventSource: EventSource cannot send the Authorization header the
// API key goes in, and a key in the URL would land in logs and history. The parser follows the HTML standard's
// event-stream rules for what Conclave sends: `event:` and `data:` fields, blank-line-terminated events, `:`
// comments (the server's pings). Both the dashboard's live stream and the chat's streamed answers use it.
"use strict";

// Calls onEvent(name, data) for each event of the response body; resolves when the stream ends.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let name = "message";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r\n|\r|\n/)) >= 0) {
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

// Follows `url` for as long as `signal` is not aborted, reconnecting after a drop (1 s, then up to 5 s apart).
// `headers()` gives the request's headers at each try; `state(s)` hears "connecting", "live" and "lost";
// `refused(response)` is called (and following stops) when the server answers 401.
async function follow(url, { headers, onEvent, state, refused, signal }) {
  let wait = 1000;
  while (!signal.aborted) {
    try {
      const response = await fetch(url, { headers: headers(), signal, cache: "no-store" });
      if (response.status === 401) { refused(response); return; }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      state("live");
      wait = 1000;
      await readEvents(response, onEvent);
    } catch (error) {
      if (signal.aborted) return;
    }
    state("lost");
    await new Promise((resolve) => setTimeout(resolve, wait));
    wait = Math.min(wait * 2, 5000);
  }
}
