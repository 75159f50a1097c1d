//! `desktop-probe`: what a user who is root in their own desktop does against
//! the sidecar in the security tests. Static (built by `just images`), bind
//! mounted into the test desktop; it depends on libc only.
//!
//! - `swap A B SECONDS`: exchanges A and B with `renameat2(RENAME_EXCHANGE)`
//!   as fast as it can for SECONDS (a directory and a symbolic link to
//!   another desktop's files: the race against a walk by path).
//! - `ptrace PID`: tries `PTRACE_ATTACH`; prints `attached` (exit 0) or
//!   `refused: <errno>` (exit 1).

use std::{ffi::CString, os::unix::ffi::OsStrExt, time::Instant};

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let arg = |i: usize| args.get(i).map(|a| a.as_bytes().to_vec());
    match (arg(0).as_deref(), args.len()) {
        (Some(b"swap"), 4) => swap(&args[1], &args[2], &args[3]),
        (Some(b"ptrace"), 2) => attach(&args[1]),
        _ => {
            eprintln!("usage: desktop-probe swap A B SECONDS | ptrace PID");
            std::process::exit(2)
        }
    }
}

fn c(path: &std::ffi::OsStr) -> CString {
    CString::new(path.as_bytes()).unwrap_or_else(|_| {
        eprintln!("a path with a NUL byte");
        std::process::exit(2)
    })
}

fn swap(a: &std::ffi::OsStr, b: &std::ffi::OsStr, seconds: &std::ffi::OsStr) {
    let seconds: f64 = seconds.to_string_lossy().parse().unwrap_or(10.0);
    let (a, b) = (c(a), c(b));
    let started = Instant::now();
    let mut swaps: u64 = 0;
    while started.elapsed().as_secs_f64() < seconds {
        // SAFETY: two valid C strings, plain syscall
        let r = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if r != 0 {
            eprintln!("renameat2: {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
        swaps += 1;
    }
    println!("{swaps} swaps");
}

fn attach(pid: &std::ffi::OsStr) {
    let Ok(pid) = pid.to_string_lossy().parse::<libc::pid_t>() else {
        eprintln!("not a pid");
        std::process::exit(2)
    };
    // SAFETY: PTRACE_ATTACH takes no pointers
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_ATTACH,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    if r == 0 {
        // SAFETY: as above
        unsafe {
            libc::ptrace(
                libc::PTRACE_DETACH,
                pid,
                std::ptr::null_mut::<libc::c_void>(),
                std::ptr::null_mut::<libc::c_void>(),
            )
        };
        println!("attached");
        std::process::exit(0);
    }
    println!("refused: {}", std::io::Error::last_os_error());
    std::process::exit(1);
}
