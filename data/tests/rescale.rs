//! Rescaling: a run saved on 4 ranks continues on 2, then on 3, and over the
//! epoch every document token is emitted exactly once.

mod common;

use std::collections::BTreeMap;

use bamba_data::{DataError, Loader};
use common::*;

fn count(seen: &mut BTreeMap<u32, usize>, tokens: &[u32]) {
    for &t in tokens {
        if t >= FIRST_TOKEN {
            *seen.entry(t).or_default() += 1;
        }
    }
}

fn drain(loaders: &mut [Loader], seen: &mut BTreeMap<u32, usize>) {
    let mut live = loaders.len();
    while live > 0 {
        live = 0;
        for l in loaders.iter_mut() {
            match l.next_batch(4) {
                Ok(b) => {
                    count(seen, &b);
                    live += 1;
                }
                Err(DataError::Exhausted { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
    }
}

fn assert_exactly_once(seen: &BTreeMap<u32, usize>, want: &BTreeMap<u32, usize>) {
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    let missing: Vec<_> = want
        .keys()
        .filter(|t| !seen.contains_key(t))
        .take(5)
        .collect();
    assert!(twice.is_empty(), "tokens seen more than once: {twice:?}");
    assert!(missing.is_empty(), "tokens never seen: {missing:?}");
    assert_eq!(seen.len(), want.len());
}

#[test]
fn one_epoch_on_4_then_2_then_3_ranks_sees_every_token_once() {
    let c = corpus();
    let mut cfg = common::config(&c.specs);
    cfg.epochs = Some(1);
    let mut seen = BTreeMap::new();

    let mut four = fresh(&cfg, 4);
    for b in take(&mut four, 20, 4) {
        count(&mut seen, &b);
    }
    let states = save(&four);
    drop(four);

    let mut two = resume(&cfg, 2, &states);
    for b in take(&mut two, 25, 4) {
        count(&mut seen, &b);
    }
    let states = save(&two);
    drop(two);
    assert!(
        seen.len() < c.tokens.len() / 2 * 3,
        "the 3-rank phase must have work left"
    );

    let mut three = resume(&cfg, 3, &states);
    drain(&mut three, &mut seen);
    assert_exactly_once(&seen, &c.tokens);
}

#[test]
fn one_epoch_without_stops_sees_every_token_once() {
    let c = corpus();
    let mut cfg = common::config(&c.specs);
    cfg.epochs = Some(1);
    let mut seen = BTreeMap::new();
    drain(&mut fresh(&cfg, 3), &mut seen);
    assert_exactly_once(&seen, &c.tokens);
}

#[test]
fn second_epoch_uses_a_new_order() {
    let c = corpus();
    // One dataset: with two, the mixture interleaves their epochs.
    let mut cfg = common::config(&c.specs[..1]);
    cfg.shuffle_buffer = 0;
    cfg.epochs = Some(2);
    let mut l = Loader::new(cfg, 0, 1).unwrap();
    let mut all = Vec::new();
    while let Ok(b) = l.next_batch(16) {
        all.extend(b);
    }
    let docs: Vec<u32> = all.into_iter().filter(|&t| t >= FIRST_TOKEN).collect();
    let half = docs.len() / 2;
    let (lo, hi) = c.ranges[0];
    assert_eq!(docs.len(), 2 * (hi - lo) as usize);
    assert!(docs[..half] != docs[half..], "epochs must differ in order");
    let (mut a, mut b) = (docs[..half].to_vec(), docs[half..].to_vec());
    a.sort();
    b.sort();
    assert!(
        a == (lo..hi).collect::<Vec<_>>(),
        "epoch 1 holds every token once"
    );
    assert!(a == b, "epoch 2 holds every token once");
}
