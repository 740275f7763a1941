//! Present so that filter-user can name this crate as a build-dependency (aya-build then
//! rebuilds the eBPF object when it changes). The programs are in `main.rs`.
#![no_std]
