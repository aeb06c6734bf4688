/**
 * Reading a Server-Sent Events stream in tests and benchmarks.
 *
 * @module
 */

/** One event: its name and its data parsed as JSON. */
export interface SseEvent {
  /** Event name ("message" when the stream gives none). */
  event: string;
  /** The data lines joined and parsed as JSON. */
  data: unknown;
}

/** Yields the events of an SSE body (JSON data) until the stream ends. */
export async function* sseEvents(body: ReadableStream<Uint8Array>): AsyncGenerator<SseEvent> {
  let buffer = "";
  for await (const chunk of body.pipeThrough(new TextDecoderStream())) {
    buffer += chunk;
    let end: number;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data: string[] = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}
