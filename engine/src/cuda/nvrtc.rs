//! NVRTC: CUDA C source to PTX at run time, for the reduction kernels of the collectives.
//!
//! cudarc panics when it cannot load libnvrtc, so the library is looked for here first with
//! `dlopen` (RTLD_GLOBAL, so cudarc's own load by soname finds the same library): the path in
//! `PARALLEL_NVRTC_LIB`, then a path registered by the bindings (the NVIDIA wheels next to torch),
//! then the loader's search path. Compiling needs no GPU.

use crate::config::config;
use crate::error::{Error, ErrorKind, Result};
use std::ffi::CString;
use std::sync::{Mutex, OnceLock};

static HINTS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static LOADED: OnceLock<std::result::Result<String, String>> = OnceLock::new();

/// Adds a candidate path of libnvrtc (used before the loader's search path).
pub fn add_hint(path: &str) {
    HINTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(path.to_string());
}

fn try_dlopen(name: &str) -> bool {
    // NVRTC loads its builtins library by name at compile time: from a path outside the loader's
    // search path, load the one beside it first.
    if let Some(dir) = std::path::Path::new(name).parent()
        && !dir.as_os_str().is_empty()
        && let Ok(entries) = std::fs::read_dir(dir)
    {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("libnvrtc-builtins.so")
                && let Ok(c) = CString::new(e.path().to_string_lossy().into_owned())
            {
                // SAFETY: a NUL-terminated path; the handle is kept for the process's life.
                unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            }
        }
    }
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: a NUL-terminated name; the handle is kept for the life of the process.
    !unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) }.is_null()
}

/// Finds and loads libnvrtc once; returns which file was loaded.
pub fn load() -> Result<&'static str> {
    let r = LOADED.get_or_init(|| {
        let mut tried = Vec::new();
        let mut candidates: Vec<String> = Vec::new();
        if !config().nvrtc_lib.is_empty() {
            candidates.push(config().nvrtc_lib.clone());
        }
        candidates.extend(HINTS.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
        candidates.extend(
            ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
                .iter()
                .map(|s| s.to_string()),
        );
        for c in candidates {
            if try_dlopen(&c) {
                // SAFETY: the probe only loads libraries by name; it cannot panic.
                if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                    return Ok(c);
                }
                tried.push(format!("{c} (loaded, but not under a name cudarc looks for)"));
            } else {
                tried.push(c);
            }
        }
        Err(format!(
            "libnvrtc was not found (tried {}): install the CUDA runtime compiler (pip install nvidia-cuda-nvrtc-cu12, or torch's CUDA wheels) or set PARALLEL_NVRTC_LIB to its path",
            tried.join(", ")
        ))
    });
    r.as_deref()
        .map_err(|e| Error::new(ErrorKind::Unsupported, "nvrtc", e.clone()))
}

/// Compiles CUDA C `src` into an image for `cuModuleLoadData`: a CUBIN when the options name a
/// real architecture (`--gpu-architecture=sm_90`: loads on any driver of the same major version,
/// CUDA's minor version compatibility), else NUL-terminated PTX (JIT-compiled by the driver, which
/// must then be at least as new as this NVRTC).
pub fn compile(src: &str, name: &str, options: Vec<String>) -> Result<Vec<u8>> {
    use cudarc::nvrtc::{result, sys};
    load()?;
    let fail = |what: &str, e: String| {
        Error::new(
            ErrorKind::Resource,
            "nvrtc",
            format!("{what} kernel {name} failed: {e}"),
        )
    };
    let csrc = CString::new(src).map_err(|_| fail("compiling", "NUL in the source".into()))?;
    let cname = CString::new(format!("{name}.cu"))
        .map_err(|_| fail("compiling", "NUL in the name".into()))?;
    let cubin = options
        .iter()
        .any(|o| o.starts_with("--gpu-architecture=sm_"));
    let prog = result::create_program(&csrc, Some(&cname))
        .map_err(|e| fail("creating the program of", format!("{e:?}")))?;
    // SAFETY: `prog` is a live program (created above, destroyed once below); the out-buffers
    // are sized by the matching size calls.
    let r = unsafe {
        (|| {
            if let Err(e) = result::compile_program(prog, &options) {
                let log = result::get_program_log(prog)
                    .map(|l| {
                        let b: Vec<u8> =
                            l.iter().map(|c| *c as u8).take_while(|c| *c != 0).collect();
                        String::from_utf8_lossy(&b).into_owned()
                    })
                    .unwrap_or_default();
                return Err(fail("compiling", format!("{e:?}: {log}")));
            }
            let mut n = 0usize;
            let mut out;
            if cubin {
                sys::nvrtcGetCUBINSize(prog, &mut n)
                    .result()
                    .map_err(|e| fail("getting the CUBIN of", format!("{e:?}")))?;
                out = vec![0u8; n];
                sys::nvrtcGetCUBIN(prog, out.as_mut_ptr().cast())
                    .result()
                    .map_err(|e| fail("getting the CUBIN of", format!("{e:?}")))?;
            } else {
                sys::nvrtcGetPTXSize(prog, &mut n)
                    .result()
                    .map_err(|e| fail("getting the PTX of", format!("{e:?}")))?;
                out = vec![0u8; n];
                sys::nvrtcGetPTX(prog, out.as_mut_ptr().cast())
                    .result()
                    .map_err(|e| fail("getting the PTX of", format!("{e:?}")))?;
                if out.last() != Some(&0) {
                    out.push(0);
                }
            }
            Ok(out)
        })()
    };
    // SAFETY: created above, destroyed once.
    let _ = unsafe { result::destroy_program(prog) };
    r
}
