// Exists so that redirect-agent can list this crate as a build-dependency (cache invalidation);
// the programs are in the `redirect-ebpf` binary target.
#![no_std]
