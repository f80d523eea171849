//! Hard packing: documents, each framed by the stage's BOS/EOS, are cut into
//! lines of exactly `seq_len + 1` tokens that run across document boundaries
//! (no padding, so no wasted compute; fms-fsdp and Bamba do the same).
//!
//! Besides the tokens, every line carries the [`Segment`]s it was cut from,
//! which is what the loader state saves instead of tokens.

use std::sync::Arc;

use crate::error::Result;
use crate::source::DocBlock;
use crate::state::Segment;

/// A document (or the unconsumed part of one) ready to be cut.
#[derive(Debug, Clone)]
pub struct Piece {
    pub seg: Segment,
    pub block: Arc<DocBlock>,
    pub row: usize,
}

/// A packed line with its provenance.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub tokens: Vec<u32>,
    pub segments: Vec<Segment>,
}

/// How a document is framed. Offsets in a [`Segment`] index this framed
/// sequence, `[bos] + tokens + [eos]`.
#[derive(Debug, Clone, Copy)]
pub struct Framing {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

impl Framing {
    pub fn len(&self, doc_tokens: usize) -> u32 {
        (doc_tokens + self.bos.is_some() as usize + self.eos.is_some() as usize) as u32
    }

    /// Appends framed positions `start..end` of `doc`.
    pub fn copy(&self, out: &mut Vec<u32>, doc: &[u32], start: u32, end: u32) {
        let (mut a, b) = (start as usize, end as usize);
        let off = self.bos.is_some() as usize;
        if let Some(bos) = self.bos
            && a == 0
            && b > 0
        {
            out.push(bos);
            a = 1;
        }
        let (ta, tb) = (a - off, (b - off).min(doc.len()));
        if ta < tb {
            out.extend_from_slice(&doc[ta..tb]);
        }
        if let Some(eos) = self.eos
            && b == off + doc.len() + 1
            && a < b
        {
            out.push(eos);
        }
    }
}

pub struct Packer {
    line_len: usize,
    framing: Framing,
    current: Option<Piece>,
}

impl Packer {
    pub fn new(seq_len: usize, framing: Framing, current: Option<Piece>) -> Packer {
        Packer {
            line_len: seq_len + 1,
            framing,
            current,
        }
    }

    /// What is left of the document being cut: the packer's only state
    /// between lines.
    pub fn current(&self) -> Option<Segment> {
        self.current.as_ref().map(|p| p.seg)
    }

    /// Cuts the next line, pulling pieces from `next` as needed. When `next`
    /// runs dry the last partial line is padded with `pad`; `None` once
    /// nothing at all is left.
    pub fn next_line(
        &mut self,
        pad: u32,
        mut next: impl FnMut() -> Result<Option<Piece>>,
    ) -> Result<Option<Line>> {
        let mut tokens = Vec::with_capacity(self.line_len);
        let mut segments = Vec::new();
        while tokens.len() < self.line_len {
            let piece = match &mut self.current {
                Some(p) if p.seg.start < p.seg.end => p,
                _ => match next()? {
                    Some(p) => self.current.insert(p),
                    None => {
                        self.current = None;
                        if tokens.is_empty() {
                            return Ok(None);
                        }
                        tokens.resize(self.line_len, pad);
                        break;
                    }
                },
            };
            let take = (piece.seg.end - piece.seg.start).min((self.line_len - tokens.len()) as u32);
            if take == 0 {
                continue;
            }
            let mut seg = piece.seg;
            seg.end = seg.start + take;
            self.framing
                .copy(&mut tokens, piece.block.doc(piece.row), seg.start, seg.end);
            piece.seg.start = seg.end;
            segments.push(seg);
        }
        if self
            .current
            .as_ref()
            .is_some_and(|p| p.seg.start >= p.seg.end)
        {
            self.current = None;
        }
        Ok(Some(Line { tokens, segments }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(docs: &[&[u32]]) -> Arc<DocBlock> {
        let mut b = DocBlock {
            tokens: vec![],
            offsets: vec![0],
        };
        for d in docs {
            b.tokens.extend_from_slice(d);
            b.offsets.push(b.tokens.len());
        }
        Arc::new(b)
    }

    #[test]
    fn framing_copies_any_range() {
        let f = Framing {
            bos: Some(100),
            eos: Some(200),
        };
        let doc = [1, 2, 3];
        assert_eq!(f.len(3), 5);
        let mut all = vec![];
        for (a, b) in [(0, 1), (1, 3), (3, 5)] {
            f.copy(&mut all, &doc, a, b);
        }
        assert_eq!(all, vec![100, 1, 2, 3, 200]);
        let mut v = vec![];
        f.copy(&mut v, &doc, 0, 5);
        assert_eq!(v, all);
        let none = Framing {
            bos: None,
            eos: None,
        };
        let mut v = vec![];
        none.copy(&mut v, &doc, 1, 3);
        assert_eq!(v, vec![2, 3]);
    }

    #[test]
    fn packs_across_documents_and_pads_the_end() {
        let f = Framing {
            bos: None,
            eos: Some(0),
        };
        let b = block(&[&[1, 2, 3, 4, 5], &[6, 7]]);
        let mut pieces = (0..2usize)
            .map(|row| Piece {
                seg: Segment {
                    dataset: 0,
                    shard: 0,
                    doc: row as u64,
                    start: 0,
                    end: f.len(b.doc(row).len()),
                },
                block: b.clone(),
                row,
            })
            .collect::<Vec<_>>()
            .into_iter();
        let mut p = Packer::new(3, f, None);
        let mut lines = vec![];
        while let Some(l) = p.next_line(9, || Ok(pieces.next())).unwrap() {
            lines.push(l);
        }
        let toks: Vec<_> = lines.iter().map(|l| l.tokens.clone()).collect();
        assert_eq!(
            toks,
            vec![vec![1, 2, 3, 4], vec![5, 0, 6, 7], vec![0, 9, 9, 9]]
        );
        assert_eq!(lines[1].segments.len(), 2);
        assert_eq!(
            (lines[1].segments[0].start, lines[1].segments[0].end),
            (4, 6)
        );
    }
}
