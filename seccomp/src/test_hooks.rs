//! Test-only ways to make a sandboxed thread misbehave, so tests can watch the sandbox stop
//! it. Compiled only into debug builds (`cfg(debug_assertions)`): in a release build these
//! functions do nothing and the variable is never read. Not reachable from a guest or the
//! command line.
//!
//! `CLOISTER_TEST_HOOK` holds one hook, read once by [`crate::init`]:
//! - `syscall@ROLE`: right after the thread of that role enters its sandbox, it calls
//!   `personality(0xffffffff)` (a harmless query no policy allows);
//! - `open@ROLE=PATH`: it opens PATH for reading and says on stderr how that went:
//!   `NAME: test hook: open PATH: ok` or `...: <error>`;
//! - `panic@ROLE`: it panics (`test hook: panic`).
//!
//! ROLE is a [`crate::ThreadRole`] name (`vmm-main`, `vmm-vcpu`, `blk-worker`, ...).

/// The environment variable.
pub const VARIABLE: &str = "CLOISTER_TEST_HOOK";

#[cfg(debug_assertions)]
mod imp {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    use crate::ThreadRole;

    enum Hook {
        Syscall(ThreadRole),
        Open(ThreadRole, PathBuf),
        Panic(ThreadRole),
    }

    static HOOK: OnceLock<Option<Hook>> = OnceLock::new();

    fn parse(value: &str) -> Option<Hook> {
        let (what, rest) = value.split_once('@')?;
        match what {
            "syscall" => Some(Hook::Syscall(ThreadRole::from_name(rest)?)),
            "panic" => Some(Hook::Panic(ThreadRole::from_name(rest)?)),
            "open" => {
                let (role, path) = rest.split_once('=')?;
                Some(Hook::Open(
                    ThreadRole::from_name(role)?,
                    PathBuf::from(path),
                ))
            }
            _ => None,
        }
    }

    pub fn load() {
        HOOK.get_or_init(|| {
            let value = std::env::var(super::VARIABLE).ok()?;
            let hook = parse(&value);
            if hook.is_none() {
                eprintln!("{}: ignoring {}={value}", super::VARIABLE, super::VARIABLE);
            }
            hook
        });
    }

    pub fn after_enter(role: ThreadRole) {
        match HOOK.get().and_then(Option::as_ref) {
            Some(Hook::Syscall(r)) if *r == role => {
                // SAFETY: personality(0xffffffff) only reports the current persona.
                let ret = unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffff_u64) };
                eprintln!("test hook: personality returned {ret}");
            }
            Some(Hook::Panic(r)) if *r == role => panic!("test hook: panic"),
            Some(Hook::Open(r, path)) if *r == role => {
                let name = crate::PROCESS.get().map_or("?", |p| p.name);
                match std::fs::File::open(path) {
                    Ok(_) => eprintln!("{name}: test hook: open {}: ok", path.display()),
                    Err(e) => eprintln!("{name}: test hook: open {}: {e}", path.display()),
                }
            }
            _ => {}
        }
    }
}

#[cfg(not(debug_assertions))]
mod imp {
    pub fn load() {}
    pub fn after_enter(_role: crate::ThreadRole) {}
}

pub(crate) use imp::{after_enter, load};
