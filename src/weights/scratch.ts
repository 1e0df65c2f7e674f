// Memory a conversion worker reuses from one weight to the next. A fresh GB-sized array is zero pages until it is
// written, and on a virtual machine each first-touch fault costs microseconds: reading, quantizing and writing
// every weight into fresh arrays spent more time in page faults than in the arithmetic (docs/benchmarks.md,
// "fast first run"). A Scratch keeps its pages, so only the largest weight's size is ever faulted in.

/** One growing buffer: each call gives a view of its start, valid until the next call. */
export class Scratch {
  private buffer = new ArrayBuffer(0);

  private atLeast(bytes: number): ArrayBuffer {
    // a little headroom, so weights that grow in small steps do not reallocate each time
    if (this.buffer.byteLength < bytes) this.buffer = new ArrayBuffer(Math.ceil(bytes * 1.125));
    return this.buffer;
  }

  view(bytes: number): Uint8Array<ArrayBuffer> {
    return new Uint8Array(this.atLeast(bytes), 0, bytes);
  }

  int8(length: number): Int8Array<ArrayBuffer> {
    return new Int8Array(this.atLeast(length), 0, length);
  }

  int16(length: number): Int16Array<ArrayBuffer> {
    return new Int16Array(this.atLeast(length * 2), 0, length);
  }

  float32(length: number): Float32Array<ArrayBuffer> {
    return new Float32Array(this.atLeast(length * 4), 0, length);
  }
}
