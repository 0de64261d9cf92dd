//! Picking the device: a real GPU through wgpu when there is one, else Burn's Flex CPU
//! backend. Software adapters (lavapipe, llvmpipe, WARP) are GPUs in name only and run
//! ~30× slower than Flex on the same cores, so `Auto` treats them as "no GPU".

use burn::tensor::Device;

use crate::{DeviceChoice, EngineError};

/// The chosen device and how to report it (`GPU-N` / `CPU-0`).
pub struct Selected {
    pub device: Device,
    pub name: String,
    pub is_gpu: bool,
}

pub fn select(choice: DeviceChoice) -> Result<Selected, EngineError> {
    let cpu = || Selected {
        device: Device::flex(),
        name: "CPU-0".into(),
        is_gpu: false,
    };
    match choice {
        DeviceChoice::Cpu => Ok(cpu()),
        DeviceChoice::Auto => Ok(gpu(0).unwrap_or_else(|reason| {
            tracing::info!("no usable GPU ({reason}); running on the CPU");
            cpu()
        })),
        DeviceChoice::Gpu(n) => gpu(n).map_err(EngineError::InvalidInput),
        DeviceChoice::Index(n) => gpu(n).or_else(|reason| match n {
            0 => {
                tracing::info!("device 0: no usable GPU ({reason}); running on the CPU");
                Ok(cpu())
            }
            _ => Err(EngineError::InvalidInput(reason)),
        }),
    }
}

#[cfg(feature = "wgpu")]
fn gpu(n: usize) -> Result<Selected, String> {
    use burn::tensor::DeviceKind;
    use burn::tensor::wgpu::wgpu;

    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::PRIMARY,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapters = block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    // CubeCL numbers adapters per device type, in enumeration order; do the same so the
    // N-th hardware GPU maps to the `DeviceKind` that opens it.
    let mut per_type = [0usize; 4];
    let mut gpus = Vec::new();
    for adapter in adapters {
        let info = adapter.get_info();
        let slot = match info.device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Cpu | wgpu::DeviceType::Other => {
                tracing::debug!(adapter = %info.name, "skipping software/unknown wgpu adapter");
                continue;
            }
        };
        let index = per_type[slot];
        per_type[slot] += 1;
        let kind = match slot {
            0 => DeviceKind::DiscreteGpu(index),
            1 => DeviceKind::IntegratedGpu(index),
            _ => DeviceKind::VirtualGpu(index),
        };
        gpus.push((kind, info.name, info.backend));
    }
    // Discrete before integrated before virtual: "GPU-0" is the strongest one.
    gpus.sort_by_key(|(kind, _, _)| match kind {
        DeviceKind::DiscreteGpu(i) => (0, *i),
        DeviceKind::IntegratedGpu(i) => (1, *i),
        DeviceKind::VirtualGpu(i) => (2, *i),
        _ => (3, 0),
    });
    let count = gpus.len();
    let (kind, name, backend) = gpus
        .into_iter()
        .nth(n)
        .ok_or_else(|| format!("GPU {n} requested, {count} hardware GPU adapter(s) found"))?;
    tracing::info!(gpu = n, adapter = %name, ?backend, "using wgpu");
    Ok(Selected {
        device: Device::wgpu(kind),
        name: format!("GPU-{n}"),
        is_gpu: true,
    })
}

#[cfg(not(feature = "wgpu"))]
fn gpu(_n: usize) -> Result<Selected, String> {
    Err("built without the `wgpu` feature".into())
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
