//! What the programs need to know of the running kernel's types, read from its BTF
//! (`/sys/kernel/btf/vmlinux`): the field offsets between a socket and its owner's ids
//! ([`redirect_common::owner`]). The offsets go into the object before it loads; the verifier
//! then checks every load through them against the same BTF, so a wrong offset is a load
//! failure, never a wrong read.

use btf_rs::{Btf, Type};
use redirect_common::owner::OwnerOffsets;

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading the kernel's BTF at {VMLINUX}: {0} (the agent needs a kernel built with CONFIG_DEBUG_INFO_BTF)")]
    Read(String),
    /// An earlier read's error, said again.
    #[error("{0}")]
    Cached(String),
    #[error("the kernel's BTF has no struct {0}")]
    NoStruct(&'static str),
    #[error("the kernel's struct {strukt} has no field {field} of {size} bytes at a byte offset")]
    NoField {
        strukt: &'static str,
        field: &'static str,
        size: usize,
    },
}

/// The running kernel's [`OwnerOffsets`], read once per process (the feature probe and the
/// load both ask; parsing the kernel's BTF takes a while).
pub fn owner_offsets() -> Result<&'static OwnerOffsets, BtfError> {
    static ONCE: std::sync::OnceLock<Result<OwnerOffsets, String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| read_owner_offsets().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| BtfError::Cached(e.clone()))
}

fn read_owner_offsets() -> Result<OwnerOffsets, BtfError> {
    let btf = Btf::from_file(VMLINUX).map_err(|e| BtfError::Read(e.to_string()))?;
    let ptr = size_of::<u64>();
    Ok(OwnerOffsets {
        sock_sk_socket: field_offset(&btf, "sock", "sk_socket", ptr)?,
        socket_file: field_offset(&btf, "socket", "file", ptr)?,
        file_f_cred: field_offset(&btf, "file", "f_cred", ptr)?,
        cred_fsuid: field_offset(&btf, "cred", "fsuid", 4)?,
        cred_fsgid: field_offset(&btf, "cred", "fsgid", 4)?,
        task_cred: field_offset(&btf, "task_struct", "cred", ptr)?,
    })
}

/// Byte offset of `field` (of `size` bytes) in the kernel's `struct strukt`, looking into
/// anonymous structs and unions as C does.
fn field_offset(btf: &Btf, strukt: &'static str, field: &'static str, size: usize) -> Result<u32, BtfError> {
    let types = btf
        .resolve_types_by_name(strukt)
        .map_err(|_| BtfError::NoStruct(strukt))?;
    let s = types
        .iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .ok_or(BtfError::NoStruct(strukt))?;
    find(btf, s, field, size, 0).ok_or(BtfError::NoField { strukt, field, size })
}

fn find(btf: &Btf, s: &btf_rs::Struct, field: &str, size: usize, base_bits: u32) -> Option<u32> {
    for m in &s.members {
        if m.bitfield_size().is_some_and(|b| b != 0) {
            continue;
        }
        let bits = base_bits + m.bit_offset();
        let name = btf.resolve_name(m).unwrap_or_default();
        let ty = resolved(btf, btf.resolve_chained_type(m).ok()?);
        if name.is_empty() {
            if let Some(Type::Struct(inner) | Type::Union(inner)) = &ty
                && let Some(off) = find(btf, inner, field, size, bits)
            {
                return Some(off);
            }
        } else if name == field && bits.is_multiple_of(8) && ty.as_ref().and_then(type_size) == Some(size) {
            return Some(bits / 8);
        }
    }
    None
}

/// `t` with typedefs and qualifiers peeled off.
fn resolved(btf: &Btf, mut t: Type) -> Option<Type> {
    for _ in 0..16 {
        match &t {
            Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) | Type::Restrict(_) | Type::TypeTag(_) => {
                t = btf.resolve_chained_type(t.as_btf_type()?).ok()?;
            }
            _ => return Some(t),
        }
    }
    None
}

fn type_size(t: &Type) -> Option<usize> {
    match t {
        Type::Ptr(_) => Some(size_of::<u64>()),
        Type::Int(i) => Some(i.size()),
        Type::Struct(s) | Type::Union(s) => Some(s.size()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads this machine's kernel: every offset found, each inside its struct, and fsgid right
    /// after fsuid (`kuid_t fsuid; kgid_t fsgid;` in every kernel since credentials were split
    /// out in 2.6.29).
    #[test]
    fn the_running_kernels_owner_offsets_are_found() {
        let o = owner_offsets().expect("owner offsets");
        assert_eq!(o.cred_fsgid, o.cred_fsuid + 4, "{o:?}");
        assert!(o.sock_sk_socket > 0 && o.file_f_cred > 0, "{o:?}");
        assert_ne!(*o, OwnerOffsets::UNSET);
    }
}
