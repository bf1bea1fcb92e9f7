/**
 * Worker thread of the block pipeline: the CPU-heavy steps (keyed checksum, zstd, AEAD) run here so that
 * they spread over all cores while the main thread only reads, looks up the index and writes.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { blockChecksum, isAllZero } from '../codec/checksum.js';
import { decodeObject, encodeObject, ObjectType, type CodecKeys } from '../codec/object.js';
import { ownArrayBuffer } from '../util/buffers.js';
import { gcEvery } from '../util/gc.js';
import type { WorkerInit, WorkerReply, WorkerRequest } from './workerProtocol.js';

const init = workerData as WorkerInit;
let keys: CodecKeys = { currentKeyId: init.currentKeyId, dataKeys: new Map(init.dataKeys) };
const macKey = init.macKey;

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
  } catch (err) {
    parentPort!.postMessage({ seq: req.seq, op: 'error', message: (err as Error).message } satisfies WorkerReply);
  }
});
