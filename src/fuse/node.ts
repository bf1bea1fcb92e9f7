/** The file tree a FUSE session serves: fixed for the life of the mount (only file contents may change). */

/** A file whose content comes from elsewhere (a version image). */
export interface DataSource {
  readonly size: number;
  readonly writable: boolean;
  /** Bytes actually stored (for st_blocks). */
  readonly allocated: number;
  read(offset: number, length: number): Promise<Buffer>;
  write(offset: number, data: Buffer): Promise<void>;
  flush(): Promise<void>;
  /** First offset >= `offset` that is data (`hole` false) or a hole (`hole` true); null when there is none. */
  seek(offset: number, hole: boolean): number | null;
}

export type FsNode =
  | { kind: 'dir'; ino: number; time: number; parent: number; children: Map<string, FsNode> }
  | { kind: 'file'; ino: number; time: number; content: Buffer }
  | { kind: 'data'; ino: number; time: number; source: DataSource }
  | { kind: 'link'; ino: number; time: number; target: string };

/** Builds a tree with inode numbers handed out in creation order (the root is 1, as FUSE requires). */
export class TreeBuilder {
  private next = 1;
  readonly nodes = new Map<number, FsNode>();
  readonly root: FsNode & { kind: 'dir' };

  constructor(time: number) {
    this.root = this.add({ kind: 'dir', ino: 0, time, parent: 1, children: new Map() });
  }

  private add<T extends FsNode>(n: T): T {
    n.ino = this.next++;
    this.nodes.set(n.ino, n);
    return n;
  }

  dir(parent: FsNode & { kind: 'dir' }, name: string, time: number): FsNode & { kind: 'dir' } {
    const d = this.add({ kind: 'dir' as const, ino: 0, time, parent: parent.ino, children: new Map<string, FsNode>() });
    parent.children.set(name, d);
    return d;
  }

  file(parent: FsNode & { kind: 'dir' }, name: string, time: number, content: string): void {
    parent.children.set(name, this.add({ kind: 'file' as const, ino: 0, time, content: Buffer.from(content) }));
  }

  data(parent: FsNode & { kind: 'dir' }, name: string, time: number, source: DataSource): void {
    parent.children.set(name, this.add({ kind: 'data' as const, ino: 0, time, source }));
  }

  link(parent: FsNode & { kind: 'dir' }, name: string, time: number, target: string): void {
    parent.children.set(name, this.add({ kind: 'link' as const, ino: 0, time, target }));
  }
}
