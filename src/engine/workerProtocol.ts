/** Messages between the main thread and the block pipeline's workers. Buffers travel as transferred ArrayBuffers. */
export interface WorkerInit {
  macKey: Uint8Array;
  dataKeys: [number, Uint8Array][];
  currentKeyId: number;
  compress: boolean;
  zstdLevel: number;
  blockSize: number;
  /** The pipeline's shared block memory (arena.ts): slot-based requests read and write it in place. */
  arena: SharedArrayBuffer;
  arenaSlotSize: number;
}

/** New keys for the workers (the keyring changed under a running process: a rekey elsewhere). */
export interface WorkerKeys {
  dataKeys: [number, Uint8Array][];
  currentKeyId: number;
}

export type WorkerRequest =
  | { seq: number; op: 'digest'; data: ArrayBuffer }
  | { seq: number; op: 'seal'; data: ArrayBuffer; context: ArrayBuffer }
  | { seq: number; op: 'open'; object: ArrayBuffer; context: ArrayBuffer; checksum: ArrayBuffer; size: number }
  | ({ seq: number; op: 'keys' } & WorkerKeys)
  /** Slot-based (arena.ts): the block is `length` bytes at BLOCK_AT in arena slot `slot`. */
  | { seq: number; op: 'digestSlot'; slot: number; length: number }
  /** Seals the block in `slot` in place: the object replaces it (reply: where it is in the slot). */
  | { seq: number; op: 'sealSlot'; slot: number; length: number; context: Uint8Array }
  /** Opens the object of `rawLength` bytes at the start of slot `raw` in place, checked against `checksum` (reply: where the block is). */
  | { seq: number; op: 'openSlot'; raw: number; rawLength: number; size: number; context: Uint8Array; checksum: Uint8Array };

export type WorkerReply =
  | { seq: number; op: 'digest'; data: ArrayBuffer; checksum: ArrayBuffer | null }
  | { seq: number; op: 'seal'; object: ArrayBuffer; data: ArrayBuffer; keyId: number }
  | { seq: number; op: 'open'; plain: ArrayBuffer }
  | { seq: number; op: 'keys' }
  | { seq: number; op: 'digestSlot'; checksum: Uint8Array | null }
  | { seq: number; op: 'sealSlot'; start: number; length: number; keyId: number }
  | { seq: number; op: 'openSlot'; at: number }
  | { seq: number; op: 'error'; message: string };
