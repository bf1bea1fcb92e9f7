/**
 * Worker thread of the block pipeline: the CPU-heavy steps (keyed checksum, zstd, AEAD) run here so that
 * they spread over all cores while the main thread only reads, looks up the index and writes.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { blockChecksum, isAllZero } from '../codec/checksum.js';
import { decodeBlockInPlace, decodeObject, encodeBlockInPlace, encodeObject, ObjectType, type CodecKeys } from '../codec/object.js';
import { zstdBound, ZstdWorkspace } from '../codec/zstdWorkspace.js';
import { ownArrayBuffer } from '../util/buffers.js';
import { collectGarbage, collectYoung, gcEvery } from '../util/gc.js';
import { BLOCK_AT, slotView } from './arena.js';
import type { WorkerInit, WorkerReply, WorkerRequest } from './workerProtocol.js';

const init = workerData as WorkerInit;
let keys: CodecKeys = { currentKeyId: init.currentKeyId, dataKeys: new Map(init.dataKeys) };
const macKey = init.macKey;
/** Reused for every slot-based block: zstd contexts, and the compressed form of the block being sealed. */
const zstd = new ZstdWorkspace(init.zstdLevel, init.blockSize);
const scratch = Buffer.allocUnsafeSlow(zstdBound(init.blockSize));
/**
 * glibc trims a thread's heap whenever more than 128 KiB at its top is free, so the AEAD's 64 KiB output
 * pieces (freed together by each scavenge) would come back as fresh, zero-filled pages for every block. Freeing
 * one large mmap'ed allocation raises glibc's mmap and trim thresholds (its dynamic threshold), after which
 * the pieces are reused heap memory. Measured: 100,000 page faults per 1 GiB backup became 27,000.
 */
function raiseMallocThresholds(): void {
  // Allocated and dropped at once: only the free matters (the collection below releases it).
  Buffer.allocUnsafeSlow(Math.max(init.blockSize / 2, 1 << 20) + (1 << 20))[0] = 1;
  collectGarbage();
}
raiseMallocThresholds();
const slot = (n: number, length: number) => slotView(init.arena, init.arenaSlotSize, n, length);

function handle(req: WorkerRequest): { reply: WorkerReply; transfer: ArrayBuffer[] } {
  switch (req.op) {
    case 'digest': {
      const data = new Uint8Array(req.data);
      if (isAllZero(data)) return { reply: { seq: req.seq, op: 'digest', data: req.data, checksum: null }, transfer: [req.data] };
      const checksum = blockChecksum(macKey, data);
      return { reply: { seq: req.seq, op: 'digest', data: req.data, checksum: ownArrayBuffer(checksum) }, transfer: [req.data] };
    }
    case 'seal': {
      const obj = encodeObject(new Uint8Array(req.data), keys, {
        type: ObjectType.Block,
        compress: init.compress,
        zstdLevel: init.zstdLevel,
        context: new Uint8Array(req.context),
      });
      const out = ownArrayBuffer(obj);
      // The input travels back so the main thread can reuse it for the next block.
      return { reply: { seq: req.seq, op: 'seal', object: out, data: req.data, keyId: keys.dataKeys.size > 0 ? keys.currentKeyId : 0 }, transfer: [out, req.data] };
    }
    case 'digestSlot': {
      const data = slot(req.slot, BLOCK_AT + req.length).subarray(BLOCK_AT);
      return { reply: { seq: req.seq, op: 'digestSlot', checksum: isAllZero(data) ? null : blockChecksum(macKey, data) }, transfer: [] };
    }
    case 'sealSlot': {
      const opts = { type: ObjectType.Block, compress: init.compress, zstdLevel: init.zstdLevel, context: req.context };
      const [start, length] = encodeBlockInPlace(slot(req.slot, init.arenaSlotSize), BLOCK_AT, req.length, keys, opts, zstd, scratch);
      return { reply: { seq: req.seq, op: 'sealSlot', start, length, keyId: keys.dataKeys.size > 0 ? keys.currentKeyId : 0 }, transfer: [] };
    }
    case 'openSlot': {
      if (req.size > init.blockSize) throw new Error(`block of ${req.size} bytes is larger than the repository's blocks`);
      const mem = slot(req.raw, init.arenaSlotSize);
      const at = decodeBlockInPlace(mem, req.rawLength, req.size, keys, req.context, zstd, scratch);
      if (!blockChecksum(macKey, mem.subarray(at, at + req.size)).equals(req.checksum)) throw new Error('block checksum does not match its contents');
      return { reply: { seq: req.seq, op: 'openSlot', at }, transfer: [] };
    }
    case 'keys':
      keys = { currentKeyId: req.currentKeyId, dataKeys: new Map(req.dataKeys) };
      return { reply: { seq: req.seq, op: 'keys' }, transfer: [] };
    case 'open': {
      // The block's size from the index bounds its decompression (a zstd bomb is refused, not inflated).
      const decoded = decodeObject(new Uint8Array(req.object), keys, new Uint8Array(req.context), { maxPlain: req.size });
      if (decoded.type !== ObjectType.Block) throw new Error('object is not a block object');
      if (decoded.plain.length !== req.size) throw new Error(`block has ${decoded.plain.length} bytes instead of ${req.size}`);
      const actual = blockChecksum(macKey, decoded.plain);
      if (!actual.equals(Buffer.from(req.checksum))) throw new Error('block checksum does not match its contents');
      const out = ownArrayBuffer(decoded.plain);
      return { reply: { seq: req.seq, op: 'open', plain: out }, transfer: [out] };
    }
  }
}

const tick = gcEvery(4);

parentPort!.on('message', (req: WorkerRequest) => {
  try {
    const { reply, transfer } = handle(req);
    parentPort!.postMessage(reply, transfer);
    if (req.op === 'seal' || req.op === 'open') tick();
    else if (req.op === 'sealSlot' || req.op === 'openSlot') collectYoung();
  } catch (err) {
    parentPort!.postMessage({ seq: req.seq, op: 'error', message: (err as Error).message } satisfies WorkerReply);
  }
});
