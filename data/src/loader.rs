//! The loader: a background thread that reads, mixes and packs lines, and
//! the trainer-side handle that shuffles them into batches and keeps the
//! state of exactly what the trainer has received.
//!
//! Prefetching and exact state pull against each other: the thread runs
//! ahead, so its own state describes the future. Each line therefore travels
//! with the [`Delta`] of reader state that producing it caused; the handle
//! applies deltas as it takes lines, so `state()` is always the state after
//! the last line delivered, however far ahead the thread is. The shuffle
//! buffer lives on the handle's side for the same reason. One producer per
//! rank, with rank-disjoint shards, so there is no worker duplication.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::catalog::{BlockCache, Catalog};
use crate::config::LoaderConfig;
use crate::error::{DataError, Result};
use crate::mixture::Mixture;
use crate::packing::{Framing, Line, Packer, Piece};
use crate::shards::{
    Cursor, EpochOrder, block_key, epoch_key, name_key, owned, permute, pick_shard, shard_positions,
};
use crate::shuffle::{Rng, ShuffleBuffer};
use crate::state::{DatasetLayout, LoaderState, RankStart, RunShape, STATE_VERSION, Segment};

/// Reader state changes caused by producing one line.
#[derive(Debug, Default)]
struct Delta {
    cursors: Vec<(u32, u32, Cursor)>,
    mixture: Vec<(u32, u64)>,
    current: Option<Segment>,
    replayed: u32,
}

enum Msg {
    Line(Line, Delta),
    End,
    Failed(DataError),
}

/// The reader state as of the last line handed to the trainer.
struct Mirror {
    cursors: Vec<Vec<Cursor>>,
    mixture_tokens: Vec<u64>,
    current: Option<Segment>,
    replay: VecDeque<Segment>,
}

impl Mirror {
    fn apply(&mut self, d: Delta) {
        for (ds, i, c) in d.cursors {
            self.cursors[ds as usize][i as usize] = c;
        }
        for (ds, t) in d.mixture {
            self.mixture_tokens[ds as usize] += t;
        }
        self.current = d.current;
        self.replay.drain(..d.replayed as usize);
    }
}

pub struct Loader {
    cfg: LoaderConfig,
    rank: usize,
    world: usize,
    layouts: Vec<DatasetLayout>,
    rx: Receiver<Msg>,
    worker: Option<JoinHandle<()>>,
    mirror: Mirror,
    buffer: ShuffleBuffer<Line>,
    ended: bool,
    failed: bool,
    lines: u64,
}

impl Loader {
    /// Validates everything it can before training (files, columns, types,
    /// weights); errors name the file.
    pub fn new(cfg: LoaderConfig, rank: usize, world: usize) -> Result<Loader> {
        Self::start(cfg, rank, world, None)
    }

    /// Resume: `states` are the saved states of ALL ranks of the previous run
    /// (any world size dividing `logical_shards`).
    pub fn resume(
        cfg: LoaderConfig,
        rank: usize,
        world: usize,
        states: &[LoaderState],
    ) -> Result<Loader> {
        Self::start(cfg, rank, world, Some(states))
    }

    fn start(
        cfg: LoaderConfig,
        rank: usize,
        world: usize,
        states: Option<&[LoaderState]>,
    ) -> Result<Loader> {
        cfg.validate(rank, world)?;
        let mut catalogs = cfg
            .datasets
            .iter()
            .map(|d| Catalog::scan(d, &cfg.column))
            .collect::<Result<Vec<_>>>()?;
        for c in &catalogs {
            if c.documents < cfg.logical_shards as u64 {
                return Err(DataError::Config(format!(
                    "dataset `{}` ({}) has {} documents, fewer than the {} logical shards: every shard needs at least one",
                    c.name,
                    c.root.display(),
                    c.documents,
                    cfg.logical_shards
                )));
            }
        }
        let names: Vec<(String, u64)> = catalogs
            .iter()
            .map(|c| (c.name.clone(), c.documents))
            .collect();
        let shape = RunShape {
            seed: cfg.seed,
            logical_shards: cfg.logical_shards,
            seq_len: cfg.seq_len,
            bos_token: cfg.bos_token,
            eos_token: cfg.eos_token,
            datasets: &names,
        };
        let defaults: Vec<u64> = catalogs
            .iter()
            .map(|c| c.default_block_docs(cfg.block_tokens, cfg.logical_shards))
            .collect();
        let start = match states {
            None => crate::state::fresh(&shape, &defaults, rank, world),
            Some(s) => crate::state::resume(&shape, rank, world, s)?,
        };
        for (c, &b) in catalogs.iter_mut().zip(&start.block_docs) {
            c.set_block_docs(b);
        }
        let layouts = catalogs
            .iter()
            .map(|c| DatasetLayout {
                name: c.name.clone(),
                documents: c.documents,
                block_docs: c.block_docs,
            })
            .collect();
        let catalogs: Vec<Arc<Catalog>> = catalogs.into_iter().map(Arc::new).collect();
        let framing = Framing {
            bos: cfg.bos_token,
            eos: cfg.eos_token,
        };
        let mut caches: Vec<BlockCache> = catalogs.iter().map(|_| BlockCache::default()).collect();
        check_segments(&catalogs, &start, &cfg)?;
        let buffered = rebuild_lines(&catalogs, &mut caches, &cfg.column, framing, &start.buffer)?;

        let RankStart {
            cursors,
            mixture_tokens,
            current,
            replay,
            shuffle_rng,
            lines,
            ..
        } = start;
        let mirror = Mirror {
            cursors: cursors.clone(),
            mixture_tokens: mixture_tokens.clone(),
            current,
            replay: replay.clone(),
        };
        let producer = Producer {
            mixture: Mixture::new(&cfg.datasets.iter().map(|d| d.weight).collect::<Vec<_>>()),
            available: vec![true; catalogs.len()],
            sizes: catalogs
                .iter()
                .map(|c| {
                    owned(cfg.logical_shards, rank, world)
                        .map(|s| {
                            let r = shard_positions(c.blocks.len() as u64, cfg.logical_shards, s);
                            r.end - r.start
                        })
                        .collect()
                })
                .collect(),
            catalogs,
            caches,
            shard0: owned(cfg.logical_shards, rank, world).start,
            cfg: cfg.clone(),
            framing,
            cursors,
            tokens: mixture_tokens,
            replay,
            restore: current,
            active: vec![None; names.len()],
            orders: vec![Vec::new(); names.len()],
            delta: Delta::default(),
        };
        let (tx, rx) = bounded(cfg.prefetch.max(1));
        let worker = std::thread::Builder::new()
            .name(format!("bamba-data-{rank}"))
            .spawn(move || producer.run(tx))
            .map_err(|e| DataError::Worker(e.to_string()))?;
        Ok(Loader {
            buffer: ShuffleBuffer::new(cfg.shuffle_buffer, Rng(shuffle_rng), buffered),
            cfg,
            rank,
            world,
            layouts,
            rx,
            worker: Some(worker),
            mirror,
            ended: false,
            failed: false,
            lines,
        })
    }

    /// `batch` lines of `seq_len + 1` tokens each, row-major. Inputs are
    /// `line[..seq_len]`, targets `line[1..]`.
    pub fn next_batch(&mut self, batch: usize) -> Result<Vec<u32>> {
        let len = self.cfg.seq_len + 1;
        let mut out = Vec::with_capacity(batch * len);
        for i in 0..batch {
            match self.next_line()? {
                Some(line) => out.extend_from_slice(&line.tokens),
                None if i == 0 => return Err(DataError::Exhausted { rank: self.rank }),
                // Only with `epochs` set: the final batch is topped up.
                None => out.resize(batch * len, self.cfg.eos_token.unwrap_or(0)),
            }
        }
        Ok(out)
    }

    /// The next line with its provenance; `None` once a finite run is over.
    pub fn next_line(&mut self) -> Result<Option<Line>> {
        if self.failed {
            return Err(DataError::Worker("stopped after an earlier error".into()));
        }
        while !self.ended {
            match self.rx.recv() {
                Ok(Msg::Line(line, delta)) => {
                    self.mirror.apply(delta);
                    if let Some(out) = self.buffer.push(line) {
                        self.lines += 1;
                        return Ok(Some(out));
                    }
                }
                Ok(Msg::End) => self.ended = true,
                Ok(Msg::Failed(e)) => {
                    self.failed = true;
                    return Err(e);
                }
                Err(_) => {
                    self.failed = true;
                    return Err(DataError::Worker("the producer thread exited".into()));
                }
            }
        }
        let out = self.buffer.pop();
        self.lines += out.is_some() as u64;
        Ok(out)
    }

    pub fn state(&self) -> LoaderState {
        LoaderState {
            version: STATE_VERSION,
            rank: self.rank,
            world: self.world,
            seed: self.cfg.seed,
            logical_shards: self.cfg.logical_shards,
            seq_len: self.cfg.seq_len,
            bos_token: self.cfg.bos_token,
            eos_token: self.cfg.eos_token,
            datasets: self.layouts.clone(),
            cursors: self.mirror.cursors.clone(),
            mixture_tokens: self.mirror.mixture_tokens.clone(),
            current: self.mirror.current,
            replay: self.mirror.replay.iter().copied().collect(),
            buffer: self
                .buffer
                .items()
                .iter()
                .map(|l| l.segments.clone())
                .collect(),
            shuffle_rng: self.buffer.rng().0,
            lines: self.lines,
        }
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Dropping the receiver makes the producer's pending or next send
        // fail, which ends its loop.
        let (_, dead) = bounded(0);
        let rx = std::mem::replace(&mut self.rx, dead);
        drop(rx);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Rejects saved segments that point outside the data (a state from other
/// data that happens to have the same document counts cannot, but a hand
/// edited or corrupted one can).
fn check_segments(cats: &[Arc<Catalog>], start: &RankStart, cfg: &LoaderConfig) -> Result<()> {
    let segs = start
        .current
        .iter()
        .chain(start.replay.iter())
        .chain(start.buffer.iter().flatten());
    for s in segs {
        let ok = (s.dataset as usize) < cats.len()
            && s.doc < cats[s.dataset as usize].documents
            && (s.shard as usize) < cfg.logical_shards
            && s.start < s.end;
        if !ok {
            return Err(DataError::State(format!(
                "saved segment {s:?} is outside the data"
            )));
        }
    }
    Ok(())
}

/// Re-reads the documents behind saved lines, one block at a time.
fn rebuild_lines(
    cats: &[Arc<Catalog>],
    caches: &mut [BlockCache],
    column: &str,
    framing: Framing,
    lines: &[Vec<Segment>],
) -> Result<Vec<Line>> {
    let mut order: Vec<(usize, usize, u64, usize)> = Vec::new();
    for (li, l) in lines.iter().enumerate() {
        for (si, s) in l.iter().enumerate() {
            order.push((
                s.dataset as usize,
                cats[s.dataset as usize]
                    .locate(s.doc)
                    .map(|x| x.0)
                    .unwrap_or(0),
                li as u64,
                si,
            ));
        }
    }
    order.sort();
    let mut parts: Vec<Vec<Vec<u32>>> = lines.iter().map(|l| vec![Vec::new(); l.len()]).collect();
    for (d, _, li, si) in order {
        let seg = lines[li as usize][si];
        let piece = fetch(&cats[d], &mut caches[d], column, framing, seg)?;
        framing.copy(
            &mut parts[li as usize][si],
            piece.block.doc(piece.row),
            seg.start,
            seg.end,
        );
    }
    Ok(parts
        .into_iter()
        .zip(lines)
        .map(|(p, segs)| Line {
            tokens: p.concat(),
            segments: segs.clone(),
        })
        .collect())
}

/// The document behind a saved segment.
fn fetch(
    cat: &Catalog,
    cache: &mut BlockCache,
    column: &str,
    framing: Framing,
    seg: Segment,
) -> Result<Piece> {
    let bad = |m: String| {
        DataError::State(format!(
            "saved segment {seg:?} of dataset `{}`: {m}",
            cat.name
        ))
    };
    let Some((block, row)) = cat.locate(seg.doc) else {
        return Err(bad("no such document".into()));
    };
    let data = cache.get(cat, column, block)?;
    if seg.end > framing.len(data.doc(row).len()) {
        return Err(bad(
            "range is past the end of the document; did the data change?".into(),
        ));
    }
    Ok(Piece {
        seg,
        block: data,
        row,
    })
}

/// The background half: mixture, shard streams and packer.
struct Producer {
    cfg: LoaderConfig,
    catalogs: Vec<Arc<Catalog>>,
    caches: Vec<BlockCache>,
    framing: Framing,
    mixture: Mixture,
    /// Whether this rank can still draw from each dataset (finite runs).
    available: Vec<bool>,
    shard0: usize,
    /// Blocks per owned shard, per dataset.
    sizes: Vec<Vec<u64>>,
    cursors: Vec<Vec<Cursor>>,
    tokens: Vec<u64>,
    replay: VecDeque<Segment>,
    /// The partly cut document of a resumed state, re-read on start.
    restore: Option<Segment>,
    /// `pick_shard`'s answer per dataset, valid until that shard's epoch
    /// ends (reading a shard only makes it more advanced).
    active: Vec<Option<usize>>,
    /// Block orders of the epochs being read, per dataset (at most two:
    /// a rank's shards are at most one epoch apart).
    orders: Vec<Vec<Arc<EpochOrder>>>,
    delta: Delta,
}

impl Producer {
    fn run(mut self, tx: Sender<Msg>) {
        let current = match self.restore.take() {
            Some(seg) => {
                let d = seg.dataset as usize;
                match fetch(
                    &self.catalogs[d],
                    &mut self.caches[d],
                    &self.cfg.column,
                    self.framing,
                    seg,
                ) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        let _ = tx.send(Msg::Failed(e));
                        return;
                    }
                }
            }
            None => None,
        };
        let mut packer = Packer::new(self.cfg.seq_len, self.framing, current);
        let pad = self.cfg.eos_token.unwrap_or(0);
        loop {
            let msg = match packer.next_line(pad, || self.next_piece()) {
                Ok(Some(line)) => {
                    let mut delta = std::mem::take(&mut self.delta);
                    delta.current = packer.current();
                    Msg::Line(line, delta)
                }
                Ok(None) => Msg::End,
                Err(e) => Msg::Failed(e),
            };
            let last = !matches!(msg, Msg::Line(..));
            if tx.send(msg).is_err() || last {
                return;
            }
        }
    }

    fn next_piece(&mut self) -> Result<Option<Piece>> {
        if let Some(seg) = self.replay.pop_front() {
            self.delta.replayed += 1;
            let d = seg.dataset as usize;
            return fetch(
                &self.catalogs[d],
                &mut self.caches[d],
                &self.cfg.column,
                self.framing,
                seg,
            )
            .map(Some);
        }
        loop {
            let Some(d) = self.mixture.pick(&self.tokens, &self.available) else {
                return Ok(None);
            };
            match self.next_doc(d)? {
                None => self.available[d] = false,
                Some(p) if p.seg.end == 0 => {}
                Some(p) => {
                    let t = p.seg.end as u64;
                    self.tokens[d] += t;
                    self.delta.mixture.push((d as u32, t));
                    return Ok(Some(p));
                }
            }
        }
    }

    fn order(&mut self, d: usize, epoch: u64) -> Arc<EpochOrder> {
        if let Some(o) = self.orders[d].iter().find(|o| o.epoch == epoch) {
            return o.clone();
        }
        let cat = &self.catalogs[d];
        let key = epoch_key(self.cfg.seed, name_key(&cat.name), epoch);
        let o = Arc::new(EpochOrder::new(&cat.groups, key, epoch));
        let cache = &mut self.orders[d];
        if cache.len() >= 2 {
            cache.remove(0);
        }
        cache.push(o.clone());
        o
    }

    /// The next document of dataset `d` on this rank, advancing its shard.
    fn next_doc(&mut self, d: usize) -> Result<Option<Piece>> {
        let Some(i) = self.active[d].or_else(|| pick_shard(&self.cursors[d], &self.sizes[d]))
        else {
            return Ok(None);
        };
        self.active[d] = Some(i);
        let c = self.cursors[d][i];
        if self.cfg.epochs.is_some_and(|e| c.epoch >= e) {
            return Ok(None);
        }
        let order = self.order(d, c.epoch);
        let cat = &self.catalogs[d];
        let shard = self.shard0 + i;
        let key = name_key(&cat.name);
        let nb = cat.blocks.len() as u64;
        let positions = shard_positions(nb, self.cfg.logical_shards, shard);
        let block = order.block(&cat.groups, positions.start + c.block);
        let rows = cat.blocks[block].rows;
        let row = permute(
            c.doc,
            rows,
            block_key(self.cfg.seed, key, c.epoch, block as u64),
        ) as usize;
        let data = self.caches[d].get(cat, &self.cfg.column, block)?;
        let mut next = Cursor {
            doc: c.doc + 1,
            ..c
        };
        if next.doc == rows {
            next = Cursor {
                block: c.block + 1,
                doc: 0,
                ..c
            };
            if next.block == positions.end - positions.start {
                next = Cursor {
                    epoch: c.epoch + 1,
                    block: 0,
                    doc: 0,
                };
                self.active[d] = None;
            }
        }
        self.cursors[d][i] = next;
        self.delta.cursors.push((d as u32, i as u32, next));
        let seg = Segment {
            dataset: d as u32,
            shard: shard as u32,
            doc: cat.blocks[block].first_doc + row as u64,
            start: 0,
            end: self.framing.len(data.doc(row).len()),
        };
        Ok(Some(Piece {
            seg,
            block: data,
            row,
        }))
    }
}
