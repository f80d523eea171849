//! Data pipeline for bamba-train (see issue 4).
