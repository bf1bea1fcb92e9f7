/** Messages between the main thread and the block pipeline's workers. Buffers travel as transferred ArrayBuffers. */
export interface WorkerInit {
  macKey: Uint8Array;
  dataKeys: [number, Uint8Array][];
  currentKeyId: number;
  compress: boolean;
  zstdLevel: number;
}

export type WorkerRequest =
  | { seq: number; op: 'digest'; data: ArrayBuffer }
  | { seq: number; op: 'seal'; data: ArrayBuffer; context: ArrayBuffer }
  | { seq: number; op: 'open'; object: ArrayBuffer; context: ArrayBuffer; checksum: ArrayBuffer; size: number };

export type WorkerReply =
  | { seq: number; op: 'digest'; data: ArrayBuffer; checksum: ArrayBuffer | null }
  | { seq: number; op: 'seal'; object: ArrayBuffer; data: ArrayBuffer }
  | { seq: number; op: 'open'; plain: ArrayBuffer }
  | { seq: number; op: 'error'; message: string };
