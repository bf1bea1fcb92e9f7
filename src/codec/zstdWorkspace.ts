import { constants as zc, createZstdCompress, createZstdDecompress, zstdCompressSync, zstdDecompressSync, type ZstdCompress, type ZstdDecompress } from 'node:zlib';
import { IntegrityError } from '../errors.js';

/**
 * The native handle behind a node:zlib stream. node:zlib's one-shot functions create a zstd context per call
 * (several MiB of tables, allocated and page-faulted anew) and return freshly allocated output; the block
 * pipeline compresses hundreds of blocks per second, so each worker keeps one context and has it write
 * into memory it already owns. This is the handle's `writeSync(flush, in, inOff, inLen, out, outOff, outLen)`
 * that node:zlib's own sync path uses; `_writeState` receives [availOut, availIn] after each call.
 */
interface NativeHandle {
  writeSync(flush: number, input: Uint8Array, inOff: number, inLen: number, out: Uint8Array, outOff: number, outLen: number): void;
  reset(): void;
  onerror: (message: string, errno: number) => void;
}
interface EngineInternals {
  _handle?: NativeHandle;
  _writeState?: Uint32Array;
}

class Engine {
  private error: string | null = null;
  private readonly handle: NativeHandle;
  private readonly state: Uint32Array;

  constructor(stream: ZstdCompress | ZstdDecompress) {
    const s = stream as unknown as EngineInternals;
    if (!s._handle || typeof s._handle.writeSync !== 'function' || !(s._writeState instanceof Uint32Array)) throw new Error('node:zlib internals changed');
    this.handle = s._handle;
    this.state = s._writeState;
    this.handle.onerror = (message) => {
      this.error = message;
    };
  }

  /** One whole frame from `input` into `out`: [bytes written, input bytes left over], or throws with zstd's message. */
  run(input: Uint8Array, out: Uint8Array): [number, number] {
    this.error = null;
    this.handle.reset();
    this.handle.writeSync(zc.ZSTD_e_end, input, 0, input.length, out, 0, out.length);
    if (this.error !== null) {
      const message = this.error;
      this.handle.reset();
      throw new Error(message);
    }
    return [out.length - this.state[0]!, this.state[1]!];
  }

  /** After run() filled its output exactly: true when the frame still had more to give (it was cut off). */
  hasMore(): boolean {
    this.error = null;
    this.handle.writeSync(zc.ZSTD_e_end, EMPTY, 0, 0, this.probe, 0, 1);
    if (this.error !== null) {
      this.handle.reset();
      return true;
    }
    return this.state[0] === 0;
  }

  private readonly probe = new Uint8Array(1);
}

const EMPTY = new Uint8Array(0);

function engine<T extends ZstdCompress | ZstdDecompress>(make: () => T): Engine | null {
  try {
    return new Engine(make());
  } catch {
    return null; // another Node.js: the one-shot functions below still work, with their allocations
  }
}

/** Worst-case size of a zstd frame of `n` bytes (ZSTD_compressBound, rounded up). */
export function zstdBound(n: number): number {
  return n + (n >>> 8) + 64 * 1024;
}

/**
 * A zstd compressor and decompressor that a worker keeps for its life: no context or output allocation per
 * block. Output goes into the caller's memory (a shared arena slot or the worker's scratch buffer).
 */
export class ZstdWorkspace {
  private readonly compressor: Engine | null;
  private readonly decompressor: Engine | null;

  constructor(
    private readonly level: number,
    /** Largest plaintext a frame may decompress to (the block size): bounds the decoder's window too. */
    private readonly maxPlain: number,
  ) {
    this.compressor = engine(() => createZstdCompress({ params: { [zc.ZSTD_c_compressionLevel]: level } }));
    this.decompressor = engine(() => createZstdDecompress({ params: { [zc.ZSTD_d_windowLogMax]: windowLogFor(maxPlain) } }));
  }

  /**
   * Compresses `plain` into `out` as one frame that declares its content size; returns its length, or -1 when
   * it does not fit (the caller stores the block uncompressed then).
   */
  compressInto(plain: Uint8Array, out: Uint8Array): number {
    if (!this.compressor) {
      const frame = zstdCompressSync(plain, { params: { [zc.ZSTD_c_compressionLevel]: this.level }, pledgedSrcSize: plain.length });
      if (frame.length > out.length) return -1;
      out.set(frame);
      return frame.length;
    }
    const [n, left] = this.compressor.run(plain, out);
    // Output full with input or frame epilogue pending: it did not fit.
    return left > 0 || n >= out.length ? -1 : n;
  }

  /**
   * Decompresses one frame into `out`, which must become exactly full: a frame that declares or produces more,
   * produces less, or carries trailing bytes is refused (IntegrityError). Never holds more than `out`.
   */
  decompressInto(frame: Uint8Array, out: Uint8Array): number {
    if (out.length > this.maxPlain) throw new IntegrityError(`Block of ${out.length} bytes is larger than this repository's blocks.`);
    if (!this.decompressor) {
      let plain: Buffer;
      try {
        plain = zstdDecompressSync(frame, { maxOutputLength: Math.max(1, out.length), params: { [zc.ZSTD_d_windowLogMax]: windowLogFor(this.maxPlain) } });
      } catch (err) {
        throw new IntegrityError('Object payload does not decompress (or decompresses to more than the block size).', { cause: err });
      }
      if (plain.length !== out.length) throw new IntegrityError(`Object payload decompresses to ${plain.length} bytes instead of ${out.length}.`);
      out.set(plain);
      return plain.length;
    }
    let n: number;
    let left: number;
    try {
      [n, left] = this.decompressor.run(frame, out);
    } catch (err) {
      throw new IntegrityError('Object payload does not decompress.', { cause: err });
    }
    if (left === 0 && n === out.length && this.decompressor.hasMore()) left = 1;
    if (left > 0)
      throw new IntegrityError(
        n === out.length ? `Object payload decompresses to more than the ${out.length} bytes it may have; decompression was stopped.` : 'Object payload has bytes after its zstd frame.',
      );
    if (n !== out.length) throw new IntegrityError(`Object payload decompresses to ${n} bytes instead of ${out.length}.`);
    return n;
  }
}

function windowLogFor(maxPlain: number): number {
  return Math.min(31, Math.max(10, Math.ceil(Math.log2(Math.max(1, maxPlain)))));
}
