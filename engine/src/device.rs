//! Picking the device: a real GPU through wgpu when there is one, else Burn's Flex CPU
//! backend. Software adapters (lavapipe, llvmpipe, WARP) are GPUs in name only and run
//! far slower than the CPU path on the same cores, so `Auto` and a bare index treat them as
//! "no GPU"; only an explicit `gpu`/`gpu:0` opens one, when it is all there is (that is how
//! CI tests the GPU path), with a warning.

#[cfg(feature = "wgpu")]
mod tuning;

use std::path::Path;

use burn::tensor::Device;

use crate::{DeviceChoice, EngineError};

/// The chosen device and how to report it (`GPU-N` / `CPU-0`).
pub struct Selected {
    pub device: Device,
    pub name: String,
    pub is_gpu: bool,
}

/// The device `choice` names. A GPU keeps its kernel tuning in `tuning_cache` (see
/// `tuning`), if the process has not opened one before.
pub fn select(choice: DeviceChoice, tuning_cache: Option<&Path>) -> Result<Selected, EngineError> {
    let cpu = || Selected {
        device: Device::flex(),
        name: "CPU-0".into(),
        is_gpu: false,
    };
    match choose(choice, adapters).map_err(EngineError::InvalidInput)? {
        Chosen::Cpu => Ok(cpu()),
        Chosen::Gpu(n, adapter) => match adapter.open(n, tuning_cache) {
            Ok(device) => Ok(Selected {
                device,
                name: format!("GPU-{n}"),
                is_gpu: true,
            }),
            Err(reason) if choice == DeviceChoice::Auto => {
                tracing::warn!("{reason}; running on the CPU");
                Ok(cpu())
            }
            Err(reason) => Err(EngineError::InvalidInput(reason)),
        },
    }
}

/// Where a choice runs: the CPU, or GPU `N` on this adapter.
#[derive(Debug)]
enum Chosen<'a> {
    Cpu,
    #[cfg_attr(
        not(feature = "wgpu"),
        expect(dead_code, reason = "no adapter exists without wgpu")
    )]
    Gpu(usize, &'a Adapter),
}

/// What `choice` means among the adapters `adapters` finds (asked only if `choice` needs them).
fn choose<'a>(
    choice: DeviceChoice,
    adapters: impl FnOnce() -> Result<&'a Adapters, String>,
) -> Result<Chosen<'a>, String> {
    match choice {
        DeviceChoice::Cpu => Ok(Chosen::Cpu),
        DeviceChoice::Auto => match adapters().and_then(|a| a.hardware(0)) {
            Ok(gpu) => Ok(gpu),
            Err(reason) => {
                tracing::info!("no usable GPU ({reason}); running on the CPU");
                Ok(Chosen::Cpu)
            }
        },
        DeviceChoice::Gpu(n) => adapters()?.any(n),
        DeviceChoice::Index(n) => match adapters().and_then(|a| a.hardware(n)) {
            Ok(gpu) => Ok(gpu),
            Err(reason) if n == 0 => {
                tracing::info!("device 0: no usable GPU ({reason}); running on the CPU");
                Ok(Chosen::Cpu)
            }
            Err(reason) => Err(reason),
        },
    }
}

#[cfg(feature = "wgpu")]
use found::{Adapter, Adapters, adapters};

#[cfg(feature = "wgpu")]
mod found {
    use std::path::Path;
    use std::sync::OnceLock;

    use burn::tensor::wgpu::{WgpuBackend, wgpu};
    use burn::tensor::{Device, DeviceKind};

    use super::Chosen;

    /// One wgpu adapter: how CubeCL opens it, its name for the log, and the device once
    /// opened (a runtime is set up once per process; engines loaded later share it).
    #[derive(Debug)]
    pub struct Adapter {
        pub(super) kind: DeviceKind,
        pub(super) name: String,
        pub(super) backend: wgpu::Backend,
        pub(super) opened: OnceLock<Result<Device, String>>,
    }

    /// What wgpu finds on this machine: hardware GPUs, strongest kind first, and the
    /// software adapter if there is one.
    #[derive(Debug)]
    pub struct Adapters {
        pub(super) hardware: Vec<Adapter>,
        pub(super) software: Option<Adapter>,
    }

    /// The adapters, asked once per process: the set does not change while we run, and the
    /// Vulkan loader is not safe with instances created on several threads at once (engines
    /// loading in parallel, as tests do).
    pub fn adapters() -> Result<&'static Adapters, String> {
        static FOUND: OnceLock<Adapters> = OnceLock::new();
        Ok(FOUND.get_or_init(Adapters::enumerate))
    }

    impl Adapter {
        pub(super) fn new(kind: DeviceKind, name: String, backend: wgpu::Backend) -> Self {
            Adapter {
                kind,
                name,
                backend,
                opened: OnceLock::new(),
            }
        }

        fn is_software(&self) -> bool {
            self.kind == DeviceKind::Cpu
        }

        /// Sets up Burn's runtime on this adapter, as GPU `n`, through the graphics API wgpu
        /// listed it on. Left to choose, CubeCL looks past a Vulkan that offers only a
        /// software adapter and probes OpenGL too, whose failure on a headless machine it
        /// logs as an error.
        pub fn open(&self, n: usize, tuning_cache: Option<&Path>) -> Result<Device, String> {
            if self.is_software() {
                tracing::warn!(
                    adapter = %self.name,
                    "GPU {n} is a software adapter (Vulkan emulated on the CPU): it runs the \
                     GPU code path, many times slower than `--device cpu`"
                );
            }
            tracing::info!(gpu = n, adapter = %self.name, backend = ?self.backend, "using wgpu");
            self.opened
                .get_or_init(|| {
                    super::tuning::configure(tuning_cache);
                    let options = Device::wgpu_options().device_kind(self.kind.clone());
                    let options = match self.backend {
                        wgpu::Backend::Vulkan => options.graphics_api(WgpuBackend::Vulkan),
                        _ => options,
                    };
                    options
                        .init()
                        .map_err(|e| format!("cannot open GPU {n} (`{}`): {e}", self.name))
                })
                .clone()
        }
    }

    impl Adapters {
        fn enumerate() -> Self {
            super::quiet_wayland::install();
            let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
                backends: wgpu::Backends::PRIMARY,
                ..wgpu::InstanceDescriptor::new_without_display_handle()
            });
            let adapters = super::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
            // CubeCL numbers adapters per device type, in enumeration order; do the same so
            // the N-th hardware GPU maps to the `DeviceKind` that opens it.
            let mut per_type = [0usize; 3];
            let mut hardware = Vec::new();
            let mut software = None;
            for adapter in adapters {
                let info = adapter.get_info();
                let (slot, kind): (usize, fn(usize) -> DeviceKind) = match info.device_type {
                    wgpu::DeviceType::DiscreteGpu => (0, DeviceKind::DiscreteGpu),
                    wgpu::DeviceType::IntegratedGpu => (1, DeviceKind::IntegratedGpu),
                    wgpu::DeviceType::VirtualGpu => (2, DeviceKind::VirtualGpu),
                    // CubeCL opens "the" CPU adapter (it has no index): the first one.
                    wgpu::DeviceType::Cpu => {
                        if software.is_none() {
                            software = Some(Adapter::new(DeviceKind::Cpu, info.name, info.backend));
                        }
                        continue;
                    }
                    wgpu::DeviceType::Other => {
                        tracing::debug!(adapter = %info.name, "skipping wgpu adapter of unknown type");
                        continue;
                    }
                };
                hardware.push(Adapter::new(kind(per_type[slot]), info.name, info.backend));
                per_type[slot] += 1;
            }
            // Discrete before integrated before virtual: "GPU-0" is the strongest one.
            hardware.sort_by_key(|adapter| match adapter.kind {
                DeviceKind::DiscreteGpu(i) => (0, i),
                DeviceKind::IntegratedGpu(i) => (1, i),
                _ => (2, 0),
            });
            tracing::debug!(?hardware, ?software, "wgpu adapters");
            Adapters { hardware, software }
        }

        /// The `n`-th hardware GPU.
        pub fn hardware(&self, n: usize) -> Result<Chosen<'_>, String> {
            match self.hardware.get(n) {
                Some(adapter) => Ok(Chosen::Gpu(n, adapter)),
                None => Err(self.missing(n)),
            }
        }

        /// The `n`-th hardware GPU, or, when there is none at all, the software adapter as
        /// GPU 0: someone who names the GPU gets it, however slow (CI tests the GPU path on
        /// lavapipe), and is told what it is.
        pub fn any(&self, n: usize) -> Result<Chosen<'_>, String> {
            match (&self.software, n) {
                (Some(adapter), 0) if self.hardware.is_empty() => Ok(Chosen::Gpu(0, adapter)),
                _ => self.hardware(n),
            }
        }

        fn missing(&self, n: usize) -> String {
            let software = match &self.software {
                Some(adapter) => format!(
                    "; software adapter `{}` not counted: the CPU path is faster",
                    adapter.name
                ),
                None => String::new(),
            };
            format!(
                "GPU {n} requested, {} hardware GPU adapter(s) found{software}",
                self.hardware.len()
            )
        }
    }
}

#[cfg(not(feature = "wgpu"))]
use no_wgpu::{Adapter, Adapters, adapters};

#[cfg(not(feature = "wgpu"))]
mod no_wgpu {
    use std::path::Path;

    use burn::tensor::Device;

    use super::Chosen;

    /// No adapters can exist without wgpu: the types have no values.
    #[derive(Debug)]
    pub enum Adapters {}
    #[derive(Debug)]
    pub enum Adapter {}

    pub fn adapters() -> Result<&'static Adapters, String> {
        Err("built without the `wgpu` feature".into())
    }

    impl Adapters {
        pub fn hardware(&self, _n: usize) -> Result<Chosen<'_>, String> {
            match *self {}
        }

        pub fn any(&self, _n: usize) -> Result<Chosen<'_>, String> {
            match *self {}
        }
    }

    impl Adapter {
        pub fn open(&self, _n: usize, _tuning_cache: Option<&Path>) -> Result<Device, String> {
            match *self {}
        }
    }
}

/// wgpu's adapter enumeration is async in form but completes at once on native targets.
#[cfg(feature = "wgpu")]
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::yield_now();
    }
}

/// Mesa's Vulkan device-select layer (installed with every Mesa Vulkan driver, lavapipe
/// included) asks the Wayland compositor which GPU drives the display, on each adapter
/// enumeration. On a headless machine libwayland then prints "error: XDG_RUNTIME_DIR is
/// invalid or not set in the environment." to stderr, which reads like a failure of ours. Its
/// log goes through a handler that libwayland lets a program replace: load the library first
/// (the layer then shares this copy), keep it loaded, and send its lines to our debug log.
/// Where libwayland is absent, so is the message.
#[cfg(all(feature = "wgpu", unix, not(target_vendor = "apple")))]
mod quiet_wayland {
    use std::ffi::{CStr, c_char, c_void};
    use std::sync::Once;

    /// `wl_log_func_t` is `void (*)(const char *fmt, va_list args)`. The arguments are not
    /// read (stable Rust has no `va_list`; the messages we see have no arguments anyway), and
    /// on the ABIs we build for a `va_list` parameter is passed as one pointer.
    unsafe extern "C" fn to_debug_log(format: *const c_char, _args: *mut c_void) {
        if format.is_null() {
            return;
        }
        // SAFETY: libwayland passes a NUL-terminated printf format string.
        let format = unsafe { CStr::from_ptr(format) }.to_string_lossy();
        tracing::debug!(message = %format.trim_end(), "libwayland (Mesa's device-select layer)");
    }

    type SetHandler = unsafe extern "C" fn(unsafe extern "C" fn(*const c_char, *mut c_void));

    pub fn install() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            // SAFETY: libwayland-client's initialisers only set up its own globals, and
            // `wl_log_set_handler_client` has this C signature in every libwayland release.
            // The library is leaked so the handler stays installed for later Vulkan instances
            // (CubeCL creates its own).
            unsafe {
                let Ok(library) = libloading::Library::new("libwayland-client.so.0") else {
                    return;
                };
                if let Ok(set) = library.get::<SetHandler>(b"wl_log_set_handler_client\0") {
                    set(to_debug_log);
                }
                std::mem::forget(library);
            }
        });
    }
}

#[cfg(all(feature = "wgpu", not(all(unix, not(target_vendor = "apple")))))]
mod quiet_wayland {
    pub fn install() {}
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::tensor::DeviceKind;
    use burn::tensor::wgpu::wgpu::Backend;

    use super::*;

    fn adapter(kind: DeviceKind, name: &str) -> Adapter {
        Adapter::new(kind, name.into(), Backend::Vulkan)
    }

    fn lavapipe() -> Option<Adapter> {
        Some(adapter(DeviceKind::Cpu, "llvmpipe (LLVM 15.0.6, 256 bits)"))
    }

    /// Where `choice` runs among `found`: `CPU-0`, or `GPU-N` and the adapter's name.
    fn on(found: &Adapters, choice: DeviceChoice) -> Result<String, String> {
        choose(choice, || Ok(found)).map(|chosen| match chosen {
            Chosen::Cpu => "CPU-0".into(),
            Chosen::Gpu(n, adapter) => format!("GPU-{n} {}", adapter.name),
        })
    }

    #[test]
    fn only_an_explicit_gpu_opens_a_software_adapter() {
        let found = Adapters {
            hardware: Vec::new(),
            software: lavapipe(),
        };
        let gpu0 = "GPU-0 llvmpipe (LLVM 15.0.6, 256 bits)";
        assert_eq!(on(&found, DeviceChoice::Gpu(0)).as_deref(), Ok(gpu0));
        for choice in [DeviceChoice::Auto, DeviceChoice::Index(0)] {
            assert_eq!(on(&found, choice).as_deref(), Ok("CPU-0"));
        }
        for choice in [DeviceChoice::Gpu(1), DeviceChoice::Index(1)] {
            let error = on(&found, choice).unwrap_err();
            assert!(error.contains("0 hardware GPU adapter(s) found"), "{error}");
            assert!(error.contains("software adapter `llvmpipe"), "{error}");
        }
    }

    #[test]
    fn a_hardware_gpu_is_gpu_0_beside_a_software_adapter() {
        let found = Adapters {
            hardware: vec![
                adapter(DeviceKind::DiscreteGpu(0), "big"),
                adapter(DeviceKind::IntegratedGpu(0), "small"),
            ],
            software: lavapipe(),
        };
        for choice in [
            DeviceChoice::Auto,
            DeviceChoice::Gpu(0),
            DeviceChoice::Index(0),
        ] {
            assert_eq!(on(&found, choice).as_deref(), Ok("GPU-0 big"));
        }
        assert_eq!(
            on(&found, DeviceChoice::Gpu(1)).as_deref(),
            Ok("GPU-1 small")
        );
        assert_eq!(
            on(&found, DeviceChoice::Index(1)).as_deref(),
            Ok("GPU-1 small")
        );
        assert!(on(&found, DeviceChoice::Gpu(2)).is_err());
    }

    #[test]
    fn no_adapter_at_all() {
        let found = Adapters {
            hardware: Vec::new(),
            software: None,
        };
        assert_eq!(on(&found, DeviceChoice::Auto).as_deref(), Ok("CPU-0"));
        assert_eq!(on(&found, DeviceChoice::Index(0)).as_deref(), Ok("CPU-0"));
        assert_eq!(
            on(&found, DeviceChoice::Gpu(0)),
            Err("GPU 0 requested, 0 hardware GPU adapter(s) found".into())
        );
    }
}
