//! datapath (in progress)
