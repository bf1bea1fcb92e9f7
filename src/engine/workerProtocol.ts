/** Messages between the main thread and the block pipeline's workers. Buffers travel as transferred ArrayBuffers. */
export interface WorkerInit {
  macKey: Uint8Array;
  dataKeys: [number, Uint8Array][];
  currentKeyId: number;
  compress: boolean;
  zstdLevel: number;
  blockSize: number;
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
  | ({ seq: number; op: 'keys' } & WorkerKeys);

export type WorkerReply =
  | { seq: number; op: 'digest'; data: ArrayBuffer; checksum: ArrayBuffer | null }
  | { seq: number; op: 'seal'; object: ArrayBuffer; data: ArrayBuffer; keyId: number }
  | { seq: number; op: 'open'; plain: ArrayBuffer }
  | { seq: number; op: 'keys' }
  | { seq: number; op: 'error'; message: string };
