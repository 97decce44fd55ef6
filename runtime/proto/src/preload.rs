//! Will `LD_PRELOAD` reach this program? (`usm exec` warns before running it.)
//!
//! The dynamic loader ignores `LD_PRELOAD` for a statically linked executable (there is
//! no loader: no `PT_INTERP` program header) and, for a set-user-ID or set-group-ID
//! executable that changes the caller's ids (secure mode, `AT_SECURE`), drops it unless
//! the library sits in a trusted directory and is itself set-user-ID. Such a program
//! would run untagged; the caller should say so clearly. A set-ID bit that changes
//! nothing (root running a set-user-ID-root program) is no obstacle.

use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Why `LD_PRELOAD` will not reach a program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreloadObstacle {
    /// Statically linked: no dynamic loader runs.
    Static,
    /// Set-user-ID or set-group-ID: the loader runs in secure mode.
    SetId,
}

impl std::fmt::Display for PreloadObstacle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PreloadObstacle::Static => {
                "statically linked (no dynamic loader), LD_PRELOAD is ignored"
            }
            PreloadObstacle::SetId => "set-user-ID or set-group-ID, the loader ignores LD_PRELOAD",
        })
    }
}

const PT_INTERP: u32 = 3;

/// Does executing a file with `mode`, owned by `owner`:`group`, change the ids of a
/// process whose real ids are `uid`:`gid`? Only then is the loader in secure mode
/// (`AT_SECURE`: the new effective id differs from the real one). A set-user-ID file
/// owned by the user running it (root running a set-user-ID-root program) changes
/// nothing, and `LD_PRELOAD` works.
fn set_id_changes_ids(mode: u32, owner: u32, group: u32, uid: u32, gid: u32) -> bool {
    (mode & 0o4000 != 0 && owner != uid) || (mode & 0o2000 != 0 && group != gid)
}

/// Checks the executable at `path` (follow `PATH` lookup before calling). `Ok(None)`
/// when the tagger will be loaded; files that are not 64-bit little-endian ELF (for
/// example `#!` scripts, whose interpreter is what runs) are reported as fine.
pub fn preload_obstacle(path: &Path) -> io::Result<Option<PreloadObstacle>> {
    let meta = std::fs::metadata(path)?;
    let (uid, gid) = crate::sys::real_ids();
    if set_id_changes_ids(meta.permissions().mode(), meta.uid(), meta.gid(), uid, gid) {
        return Ok(Some(PreloadObstacle::SetId));
    }
    let mut file = std::fs::File::open(path)?;
    let mut header = [0u8; 64];
    if file.read(&mut header)? < 64
        || &header[..4] != b"\x7fELF"
        || header[4] != 2
        || header[5] != 1
    {
        return Ok(None);
    }
    let phoff = u64::from_le_bytes(header[32..40].try_into().unwrap_or([0; 8])) as usize;
    let phentsize = usize::from(u16::from_le_bytes([header[54], header[55]]));
    let phnum = usize::from(u16::from_le_bytes([header[56], header[57]]));
    if phentsize < 4 || phnum == 0 {
        return Ok(Some(PreloadObstacle::Static));
    }
    let mut all = Vec::new();
    std::fs::File::open(path)?
        .take((phoff + phentsize * phnum) as u64)
        .read_to_end(&mut all)?;
    let has_interp = (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        all.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == PT_INTERP)
            .unwrap_or(false)
    });
    Ok(if has_interp {
        None
    } else {
        Some(PreloadObstacle::Static)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn dynamic_static_and_setuid_executables() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("p.c");
        std::fs::write(&src, "int main(void) { return 0; }\n").unwrap();
        let dynamic = dir.path().join("dyn");
        let ok = Command::new("gcc")
            .arg("-o")
            .arg(&dynamic)
            .arg(&src)
            .status();
        assert!(
            ok.map(|s| s.success()).unwrap_or(false),
            "gcc cannot build a C program (scripts/test installs gcc and libc6-dev)"
        );
        assert_eq!(preload_obstacle(&dynamic).unwrap(), None);

        // Set-user-ID and owned by the user running it: no id changes, no secure mode.
        let setuid = dir.path().join("suid");
        std::fs::copy(&dynamic, &setuid).unwrap();
        std::fs::set_permissions(&setuid, std::fs::Permissions::from_mode(0o4755)).unwrap();
        assert_eq!(preload_obstacle(&setuid).unwrap(), None);
        // Owned by someone else: the loader runs in secure mode. (chown needs root.)
        let (uid, gid) = crate::sys::real_ids();
        assert_eq!(uid, 0, "this test needs root (chown to another user)");
        std::os::unix::fs::chown(&setuid, Some(65534), None).unwrap();
        std::fs::set_permissions(&setuid, std::fs::Permissions::from_mode(0o4755)).unwrap();
        assert_eq!(
            preload_obstacle(&setuid).unwrap(),
            Some(PreloadObstacle::SetId)
        );
        // Set-group-ID of another group.
        let setgid = dir.path().join("sgid");
        std::fs::copy(&dynamic, &setgid).unwrap();
        std::os::unix::fs::chown(&setgid, None, Some(gid.wrapping_add(4242))).unwrap();
        std::fs::set_permissions(&setgid, std::fs::Permissions::from_mode(0o2755)).unwrap();
        assert_eq!(
            preload_obstacle(&setgid).unwrap(),
            Some(PreloadObstacle::SetId)
        );

        let stat = dir.path().join("static");
        let built = Command::new("gcc")
            .arg("-static")
            .arg("-o")
            .arg(&stat)
            .arg(&src)
            .status();
        assert!(
            built.map(|s| s.success()).unwrap_or(false),
            "gcc -static failed: no static libc (scripts/test installs libc6-dev)"
        );
        assert_eq!(
            preload_obstacle(&stat).unwrap(),
            Some(PreloadObstacle::Static)
        );

        let script = dir.path().join("script.sh");
        std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
        assert_eq!(preload_obstacle(&script).unwrap(), None);
        assert!(preload_obstacle(&dir.path().join("missing")).is_err());
    }
}
