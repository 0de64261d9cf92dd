//! The engine's own CubeCL kernels, for what Burn's fusion does not reach on a GPU.
//!
//! A small model's decode step on a GPU is bound by kernel launches, not arithmetic. Burn's
//! fusion merges runs of element-wise work, but it stops at a reduction and does not fuse
//! the element-wise work after one: RMSNorm (a mean of squares, then a divide and a
//! product) and attention's softmax (a max, exponentials, a sum, a divide, between two
//! matmuls) took 5 and 7 launches, twice a layer and once a layer. Each is one kernel here:
//! - [`rms_norm`]: one cube per row; the sum of squares reduced in shared memory, then each
//!   value divided by the root mean square and scaled by `γ`, as Burn's `RmsNorm` computes;
//! - [`attend_paged`]: one cube per (row, query head), every row of a step at once (decode
//!   rows and prompt chunks of any sequences), each over its own sequence's positions
//!   through its own, read from the KV pools through the sequence's block table
//!   (`device_kv`; grouped-query heads read as they are), in chunks of positions whose
//!   scores fit shared memory, the softmax taken online (a running max and sum, earlier
//!   chunks rescaled): the scores never leave the cube;
//! - [`greedy_tokens`]: one cube per row of logits, its most likely token, so a greedy step
//!   reads back one id per sequence rather than the vocabulary's logits (49k floats);
//! - [`best_candidates`]: one cube per row of logits, its most likely tokens (2048 of
//!   SmolLM2's 49k: [`candidates_for`]) and the softmax's sums, so a sampled step reads back
//!   16 KiB a row rather than 196 (the host's sampler draws from them: `run::sampling`).
//!
//! They are registered with Burn as a backend extension (`Dispatch::…`), so they run inside
//! its fusion stream as opaque operations. They take f32 tensors (the residual stream and
//! the KV cache are f32); anything else takes Burn's own operations. Reductions use shared
//! memory and barriers only, which every wgpu backend has (lavapipe included), not subgroup
//! operations.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Int, Shape, Tensor};
use burn_cubecl::cubecl;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::{CubeBackend, tensor::CubeTensor};
use cubecl::prelude::{CubeCount, CubeDim};

use super::device_kv::StepLayout;
use crate::kv::BLOCK_SIZE;

use kernels::{
    add_rms_norm_kernel, attend_paged_kernel, best_candidates_kernel, greedy_tokens_kernel,
    rms_norm_kernel,
};

/// Units per cube: a power of two (the shared-memory reductions halve it), and at least the
/// head dimension for attention (each of the first `hd` units owns one output value).
const UNITS: u32 = 128;

/// Positions whose scores one attention cube keeps in shared memory at a time (4 KiB of
/// f32, well inside WebGPU's 16 KiB minimum): longer caches are taken in chunks.
const CHUNK: u32 = 1024;

/// `x` `[.., h]` divided by the root mean square of its last dimension, times `gamma`
/// `[h]`, in `dtype`: Burn's `RmsNorm::forward` and the cast to the next matmul's weight
/// type, in one launch. `x` and `gamma` f32.
pub fn rms_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    epsilon: f64,
    dtype: DType,
) -> Tensor<D> {
    Tensor::from_dispatch(Dispatch::rms_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        epsilon as f32,
        dtype,
    ))
}

/// `x + delta`, and [`rms_norm`] of it: a residual connection and the next block's norm
/// in one launch. f32 in, the sum f32, the norm in `dtype`.
pub fn add_rms_norm<const D: usize>(
    x: Tensor<D>,
    delta: Tensor<D>,
    gamma: Tensor<1>,
    epsilon: f64,
    dtype: DType,
) -> (Tensor<D>, Tensor<D>) {
    let (sum, normed) = Dispatch::add_rms_norm(
        x.into_dispatch(),
        delta.into_dispatch(),
        gamma.into_dispatch(),
        epsilon as f32,
        dtype,
    );
    (Tensor::from_dispatch(sum), Tensor::from_dispatch(normed))
}

/// A step's attention over the paged KV: `q` `[rows, nh, 1, hd]`, row `r` attending over
/// positions `0..visible[r]` of sequence `sequence[r]`, whose position `p` is in slot
/// `tables[sequence[r], p / BLOCK_SIZE] · BLOCK_SIZE + p % BLOCK_SIZE` of the pools `keys`,
/// `values` `[slots, nkv, 1, hd]` (query head `h` reads K/V head `h / (nh / nkv)`), scaled
/// by `1/√hd`; returns `[rows, nh, 1, hd]`. `q` may be a view (a slice of the q/k tensor):
/// it is read through its strides. f32 only, `hd ≤ 128`.
pub fn attend_paged(
    q: Tensor<4>,
    keys: Tensor<4>,
    values: Tensor<4>,
    layout: &StepLayout,
) -> Tensor<4> {
    Tensor::from_dispatch(Dispatch::attend_paged(
        q.into_dispatch(),
        keys.into_dispatch(),
        values.into_dispatch(),
        layout.row_sequence.clone().into_dispatch(),
        layout.row_visible.clone().into_dispatch(),
        layout.tables.clone().into_dispatch(),
    ))
}

/// The most likely token of each row of `logits` `[rows, vocab]` (the lowest id among
/// equal logits, as the host's sampler takes it), or [`NAN_ROW`] for a row holding a NaN:
/// a device fault, which the caller reports rather than answering from it.
pub fn greedy_tokens(logits: Tensor<2>) -> Tensor<1, Int> {
    Tensor::from_dispatch(Dispatch::greedy_tokens(logits.into_dispatch()))
}

/// What [`greedy_tokens`] gives a row with a NaN in it.
pub const NAN_ROW: i64 = -1;

/// How many candidates [`best_candidates`] hands back a row of a `vocab`-wide vocabulary:
/// a 24th of it, from 256 to 2048 (SmolLM2's 49k: 2048, 16 KB a row against 196), so few
/// draws need the row after all. Measured on SmolLM2's logits (3 prompts, ~100 sampled
/// tokens each): at temperature 1 the draws that walk past 256 / 1024 / 2048 candidates
/// are 7.9 / 3.2 / 1.7 %, and the top-p 0.95 walks 39 / 18 / 4.5 %; at 0.8 and top-p 0.95,
/// 0.5 / 0 / 0 %.
pub fn candidates_for(vocab: usize) -> usize {
    (vocab / 24).clamp(256, 2048)
}

/// Where [`best_candidates`] keeps a row's figures, for `k` candidates a row.
pub mod best_layout {
    /// 1.0 where the row holds a NaN (a device fault), else 0.0.
    pub const NAN: usize = 0;
    /// Σ exp((l - max) / temperature) over the row's finite logits.
    pub const SUM: usize = 1;
    /// How many of the row's logits are finite (exact to 2^24).
    pub const FINITE: usize = 2;
    /// Σ exp(l - max) over the row's finite logits: the log-softmax's, for log-probabilities.
    pub const SUM_AT_ONE: usize = 3;
    /// The candidates' logits: those above the k-th largest value in id order, then those
    /// equal to it (unranked: the host ranks them).
    pub const VALUES: usize = 4;
    /// The candidates' ids, as f32 (exact below 2^24), after the values.
    pub const fn ids(k: usize) -> usize {
        VALUES + k
    }
    /// The width of a row: slots past the row's finite count hold id -1.
    pub const fn width(k: usize) -> usize {
        VALUES + 2 * k
    }
}

/// For each row `r` of `logits` `[rows, vocab]`, at temperature `temperatures[r]`: its
/// `k` largest finite logits with their ids (those strictly above the k-th largest value,
/// then those equal to it in id order), the sums of
/// `exp((l - max) / t)` and of `exp(l - max)` over all its finite logits, their count and a
/// NaN flag, as a row of
/// `[rows, best_layout::width(k)]` f32. The candidates are not sorted: the host ranks them.
pub fn best_candidates(logits: Tensor<2>, temperatures: Tensor<1>, k: usize) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::best_candidates(
        logits.into_dispatch(),
        temperatures.into_dispatch(),
        k as u32,
    ))
}

/// Whether [`attend_paged`] takes a head dimension of `head_dim`.
pub fn attends_head_dim(head_dim: usize) -> bool {
    head_dim <= UNITS as usize
}

#[backend_extension(Cube, Fusion)]
pub trait LlamaKernels: Backend {
    #[fusion(meta = |x, _gamma, _epsilon, dtype| TensorSpec::new(x.shape.clone(), *dtype))]
    fn rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        epsilon: f32,
        dtype: DType,
    ) -> FloatTensor<Self>;

    #[fusion(meta = |x, _delta, _gamma, _epsilon, dtype| {
        (x.clone(), TensorSpec::new(x.shape.clone(), *dtype))
    })]
    fn add_rms_norm(
        x: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        epsilon: f32,
        dtype: DType,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    #[fusion(dtype = q, shape = q)]
    fn attend_paged(
        q: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        values: FloatTensor<Self>,
        row_sequence: IntTensor<Self>,
        row_visible: IntTensor<Self>,
        tables: IntTensor<Self>,
    ) -> FloatTensor<Self>;

    #[fusion(meta = |logits| TensorSpec::new(Shape::new([logits.shape[0]]), DType::I32))]
    fn greedy_tokens(logits: FloatTensor<Self>) -> IntTensor<Self>;

    #[fusion(meta = |logits, _temperatures, k| {
        let width = best_layout::width(*k as usize);
        TensorSpec::new(Shape::new([logits.shape[0], width]), DType::F32)
    })]
    fn best_candidates(
        logits: FloatTensor<Self>,
        temperatures: FloatTensor<Self>,
        k: u32,
    ) -> FloatTensor<Self>;
}

impl LlamaKernels for CubeBackend {
    fn rms_norm(x: CubeTensor, gamma: CubeTensor, epsilon: f32, dtype: DType) -> CubeTensor {
        assert_f32(&[&x, &gamma], "rms_norm");
        let x = burn_cubecl::kernel::into_contiguous(x);
        let output = empty_like(&x, dtype);
        rms_norm_kernel::launch(
            &x.client,
            CubeCount::new_1d(rows(&x)),
            CubeDim::new_1d(UNITS),
            x.clone().into_tensor_arg(),
            gamma.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            epsilon,
            UNITS,
            [DType::F32, dtype].map(dtype_to_storage_type),
        );
        output
    }

    fn add_rms_norm(
        x: CubeTensor,
        delta: CubeTensor,
        gamma: CubeTensor,
        epsilon: f32,
        dtype: DType,
    ) -> (CubeTensor, CubeTensor) {
        assert_f32(&[&x, &delta, &gamma], "add_rms_norm");
        let (x, delta) = (
            burn_cubecl::kernel::into_contiguous(x),
            burn_cubecl::kernel::into_contiguous(delta),
        );
        assert_eq!(x.meta.shape(), delta.meta.shape(), "add_rms_norm: shapes");
        let sum = empty_like(&x, DType::F32);
        let output = empty_like(&x, dtype);
        add_rms_norm_kernel::launch(
            &x.client,
            CubeCount::new_1d(rows(&x)),
            CubeDim::new_1d(UNITS),
            x.clone().into_tensor_arg(),
            delta.into_tensor_arg(),
            gamma.into_tensor_arg(),
            sum.clone().into_tensor_arg(),
            output.clone().into_tensor_arg(),
            epsilon,
            UNITS,
            [DType::F32, dtype].map(dtype_to_storage_type),
        );
        (sum, output)
    }

    fn attend_paged(
        q: CubeTensor,
        keys: CubeTensor,
        values: CubeTensor,
        row_sequence: CubeTensor,
        row_visible: CubeTensor,
        tables: CubeTensor,
    ) -> CubeTensor {
        assert_f32(&[&q, &keys, &values], "attend_paged");
        let [rows, nh, s, hd] = q.meta.shape().dims::<4>();
        let nkv = keys.meta.shape()[1];
        assert!(s == 1 && attends_head_dim(hd) && nh % nkv == 0);
        let index_type = dtype_to_storage_type(tables.dtype);
        assert!(
            row_sequence.dtype == tables.dtype && row_visible.dtype == tables.dtype,
            "attend_paged: one integer type for the layout"
        );
        let output = empty_device_dtype(
            q.client.clone(),
            q.device.clone(),
            Shape::new([rows, nh, 1, hd]),
            DType::F32,
        );
        attend_paged_kernel::launch(
            &q.client,
            CubeCount::new_2d(nh as u32, rows as u32),
            CubeDim::new_1d(UNITS),
            q.clone().into_tensor_arg(),
            keys.into_tensor_arg(),
            values.into_tensor_arg(),
            row_sequence.into_tensor_arg(),
            row_visible.into_tensor_arg(),
            tables.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            (1.0 / (hd as f64).sqrt()) as f32,
            UNITS,
            CHUNK,
            BLOCK_SIZE as u32,
            [dtype_to_storage_type(DType::F32), index_type],
        );
        output
    }

    fn greedy_tokens(logits: CubeTensor) -> CubeTensor {
        let logits = burn_cubecl::kernel::into_contiguous(logits);
        let [rows, _] = logits.meta.shape().dims::<2>();
        let tokens = empty_device_dtype(
            logits.client.clone(),
            logits.device.clone(),
            Shape::new([rows]),
            DType::I32,
        );
        greedy_tokens_kernel::launch(
            &logits.client,
            CubeCount::new_1d(rows as u32),
            CubeDim::new_1d(UNITS),
            logits.clone().into_tensor_arg(),
            tokens.clone().into_tensor_arg(),
            UNITS,
            dtype_to_storage_type(logits.dtype),
        );
        tokens
    }

    fn best_candidates(logits: CubeTensor, temperatures: CubeTensor, k: u32) -> CubeTensor {
        assert_f32(&[&temperatures], "best_candidates");
        let logits = burn_cubecl::kernel::into_contiguous(logits);
        let [rows, _] = logits.meta.shape().dims::<2>();
        assert_eq!(temperatures.meta.shape().dims::<1>(), [rows]);
        let output = empty_device_dtype(
            logits.client.clone(),
            logits.device.clone(),
            Shape::new([rows, best_layout::width(k as usize)]),
            DType::F32,
        );
        best_candidates_kernel::launch(
            &logits.client,
            CubeCount::new_1d(rows as u32),
            CubeDim::new_1d(UNITS),
            logits.clone().into_tensor_arg(),
            temperatures.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            UNITS,
            k,
            dtype_to_storage_type(logits.dtype),
        );
        output
    }
}

/// A contiguous tensor of `x`'s shape in `dtype`, on its device.
fn empty_like(x: &CubeTensor, dtype: DType) -> CubeTensor {
    empty_device_dtype(
        x.client.clone(),
        x.device.clone(),
        x.meta.shape().clone(),
        dtype,
    )
}

/// The rows of `x`'s last dimension: one cube each.
fn rows(x: &CubeTensor) -> u32 {
    let shape = x.meta.shape();
    let h = shape[shape.len() - 1].max(1);
    (shape.iter().product::<usize>() / h) as u32
}

fn assert_f32(tensors: &[&CubeTensor], op: &str) {
    assert!(
        tensors.iter().all(|t| t.dtype == DType::F32),
        "{op}: the engine's kernels take f32 tensors"
    );
}

/// The kernels themselves, in CubeCL (apart: its prelude has a `Tensor` of its own).
mod kernels {
    use burn_cubecl::cubecl;
    use cubecl::prelude::*;

    /// One row of `input` (`CUBE_POS_X`, rows of `h` contiguous values) normalized into
    /// `output`.
    #[cube(launch)]
    pub(super) fn rms_norm_kernel<F: Float, O: Float>(
        input: &Tensor<F>,
        gamma: &Tensor<F>,
        output: &mut Tensor<O>,
        epsilon: f32,
        #[comptime] units: u32,
        #[define(F, O)] _dtypes: [ElemType; 2],
    ) {
        let h = input.shape(input.rank() - 1);
        let base = CUBE_POS_X as usize * h;
        let stride = units as usize;

        let mut partial = Shared::new_slice(units as usize);
        let mut squares = F::new(0.0);
        let mut i = UNIT_POS_X as usize;
        while i < h {
            let value = input[base + i];
            squares += value * value;
            i += stride;
        }
        partial[UNIT_POS_X as usize] = squares;
        let rms = root_mean_square::<F>(&mut partial, h, epsilon);

        let mut i = UNIT_POS_X as usize;
        while i < h {
            output[base + i] = O::cast_from(input[base + i] / rms * gamma[i * gamma.stride(0)]);
            i += stride;
        }
    }

    /// [`rms_norm_kernel`] of `x + delta`, the sum written to `sum` as well.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn add_rms_norm_kernel<F: Float, O: Float>(
        x: &Tensor<F>,
        delta: &Tensor<F>,
        gamma: &Tensor<F>,
        sum: &mut Tensor<F>,
        output: &mut Tensor<O>,
        epsilon: f32,
        #[comptime] units: u32,
        #[define(F, O)] _dtypes: [ElemType; 2],
    ) {
        let h = x.shape(x.rank() - 1);
        let base = CUBE_POS_X as usize * h;
        let stride = units as usize;

        let mut partial = Shared::new_slice(units as usize);
        let mut squares = F::new(0.0);
        let mut i = UNIT_POS_X as usize;
        while i < h {
            let value = x[base + i] + delta[base + i];
            sum[base + i] = value;
            squares += value * value;
            i += stride;
        }
        partial[UNIT_POS_X as usize] = squares;
        let rms = root_mean_square::<F>(&mut partial, h, epsilon);

        // Each unit reads back the values it wrote itself.
        let mut i = UNIT_POS_X as usize;
        while i < h {
            output[base + i] = O::cast_from(sum[base + i] / rms * gamma[i * gamma.stride(0)]);
            i += stride;
        }
    }

    /// `√(Σ partial / h + ε)`, the units' sums of squares in `partial`.
    #[cube]
    fn root_mean_square<F: Float>(partial: &mut Shared<[F]>, h: usize, epsilon: f32) -> F {
        let total = reduce_sum::<F>(partial);
        (total / F::cast_from(h as u32) + F::cast_from(epsilon)).sqrt()
    }

    /// Query head `CUBE_POS_X` of row `CUBE_POS_Y` attending over its sequence's visible
    /// positions, read through the sequence's block table, with an online softmax over
    /// chunks of `chunk` positions.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend_paged_kernel<F: Float, I: Int>(
        q: &Tensor<F>,
        keys: &Tensor<F>,
        values: &Tensor<F>,
        row_sequence: &Tensor<I>,
        row_visible: &Tensor<I>,
        tables: &Tensor<I>,
        output: &mut Tensor<F>,
        scale: f32,
        #[comptime] units: u32,
        #[comptime] chunk: u32,
        #[comptime] block_size: u32,
        #[define(F, I)] _dtypes: [ElemType; 2],
    ) {
        let head = CUBE_POS_X as usize;
        let row = CUBE_POS_Y as usize;
        let unit = UNIT_POS_X as usize;
        let stride = units as usize;
        let block = block_size as usize;
        let hd = q.shape(3);
        let group = q.shape(1) / keys.shape(1);
        let kv_head = head / group;
        let sequence = usize::cast_from(row_sequence[row * row_sequence.stride(0)]);
        let t = usize::cast_from(row_visible[row * row_visible.stride(0)]);
        let table = sequence * tables.stride(0);
        let table_step = tables.stride(1);

        // The query, read once into shared memory (every unit reads all of it per key).
        let mut query = Shared::new_slice(units as usize);
        let q_base = row * q.stride(0) + head * q.stride(1);
        if unit < hd {
            query[unit] = q[q_base + unit * q.stride(3)];
        }
        let (k_slot, k_dim) = (keys.stride(0), keys.stride(3));
        let (v_slot, v_dim) = (values.stride(0), values.stride(3));
        let k_head = kv_head * keys.stride(1);
        let v_head = kv_head * values.stride(1);
        sync_cube();

        let mut scores = Shared::new_slice(chunk as usize);
        // Each chunk position's slot, found once per chunk for the values pass.
        let mut slots = Shared::new_slice(chunk as usize);
        let mut partial = Shared::new_slice(units as usize);
        let scale = F::cast_from(scale);
        // The running max (a finite floor: WGSL has no infinity literal) and sum of the
        // softmax, and this unit's output value (units `0..hd` own one each).
        let mut running_max = F::new(-3.0e38);
        let mut running_sum = F::new(0.0);
        let mut acc = F::new(0.0);

        let mut start = 0usize;
        while start < t {
            let end = select(start + (chunk as usize) < t, start + chunk as usize, t);

            // Scores of the chunk, and their max.
            let mut local_max = F::new(-3.0e38);
            let mut j = start + unit;
            while j < end {
                let page = usize::cast_from(tables[table + (j / block) * table_step]);
                let slot = page * block + j % block;
                slots[j - start] = slot as u32;
                let mut dot = F::new(0.0);
                let key = slot * k_slot + k_head;
                for d in 0..hd {
                    dot += query[d] * keys[key + d * k_dim];
                }
                let score = dot * scale;
                scores[j - start] = score;
                local_max = max(local_max, score);
                j += stride;
            }
            partial[unit] = local_max;
            let new_max = max(running_max, reduce_max::<F>(&mut partial));

            // Exponentials of the chunk, and their sum.
            let mut local_sum = F::new(0.0);
            let mut j = start + unit;
            while j < end {
                let p = (scores[j - start] - new_max).exp();
                scores[j - start] = p;
                local_sum += p;
                j += stride;
            }
            partial[unit] = local_sum;
            let chunk_sum = reduce_sum::<F>(&mut partial);

            // Earlier chunks rescaled to the new max, this one's values added.
            let rescale = (running_max - new_max).exp();
            running_sum = running_sum * rescale + chunk_sum;
            if unit < hd {
                let mut value = F::new(0.0);
                for j in start..end {
                    let slot = slots[j - start] as usize;
                    value += scores[j - start] * values[slot * v_slot + v_head + unit * v_dim];
                }
                acc = acc * rescale + value;
            }
            running_max = new_max;
            // The next chunk overwrites the scores this one's values were just read from.
            sync_cube();
            start = end;
        }

        if unit < hd {
            let out_base = row * output.stride(0) + head * output.stride(1);
            let at = out_base + unit * output.stride(3);
            output[at] = acc / running_sum;
        }
    }

    /// Row `CUBE_POS_X` of `logits` (rows of `vocab` contiguous values): the id of its
    /// largest value, the lowest of equal ones, or -1 where a value is NaN.
    #[cube(launch)]
    pub(super) fn greedy_tokens_kernel<F: Float>(
        logits: &Tensor<F>,
        tokens: &mut Tensor<i32>,
        #[comptime] units: u32,
        #[define(F)] _dtype: ElemType,
    ) {
        let vocab = logits.shape(1);
        let base = CUBE_POS_X as usize * vocab;
        let unit = UNIT_POS_X as usize;
        let stride = units as usize;

        // Each unit's best over ids `unit, unit + stride, …` (ascending, so a strict `>`
        // keeps the lowest of equal values); a unit past the row's end starts from id 0.
        let first = select(unit < vocab, unit, 0);
        let mut best = logits[base + first];
        let mut best_id = first as u32;
        let mut nan = u32::cast_from(IsNan::is_nan(best));
        let mut i = first + stride;
        while i < vocab {
            let value = logits[base + i];
            if value > best {
                best = value;
                best_id = i as u32;
            }
            nan |= u32::cast_from(IsNan::is_nan(value));
            i += stride;
        }

        let mut values = Shared::new_slice(units as usize);
        let mut ids = Shared::new_slice(units as usize);
        let mut nans = Shared::new_slice(units as usize);
        values[unit] = best;
        ids[unit] = best_id;
        nans[unit] = nan;
        sync_cube();
        let mut half = CUBE_DIM_X as usize / 2;
        while half > 0 {
            if unit < half {
                let (value, id) = (values[unit + half], ids[unit + half]);
                if value > values[unit] || (value == values[unit] && id < ids[unit]) {
                    values[unit] = value;
                    ids[unit] = id;
                }
                nans[unit] |= nans[unit + half];
            }
            sync_cube();
            half /= 2;
        }
        if unit == 0 {
            tokens[CUBE_POS_X as usize] = select(nans[0] == 0, ids[0] as i32, -1i32);
        }
    }

    /// Row `CUBE_POS_X` of `logits` (rows of `vocab` contiguous values) into row
    /// `CUBE_POS_X` of `output` (`super::best_layout`): the row's max and the softmax sum at
    /// its temperature; then the `k`-th largest finite value found by bisection on the
    /// values' order-preserving bit patterns (each of 32 rounds counts the values at or
    /// above a candidate threshold); then the values above it and as many equal to it as
    /// fit, in id order, written at slots found from every unit's counts (each unit owns a
    /// contiguous range of ids, so the order does not depend on timing).
    #[cube(launch)]
    pub(super) fn best_candidates_kernel<F: Float>(
        logits: &Tensor<F>,
        temperatures: &Tensor<f32>,
        output: &mut Tensor<f32>,
        #[comptime] units: u32,
        #[comptime] k: u32,
        #[define(F)] _dtype: ElemType,
    ) {
        let vocab = logits.shape(1);
        let row = CUBE_POS_X as usize;
        let base = row * vocab;
        let out = row * output.shape(1);
        let unit = UNIT_POS_X as usize;
        let stride = units as usize;
        let k = k as usize;
        let temperature = temperatures[row * temperatures.stride(0)];

        // The row's max over its finite values (from a finite floor: WGSL has no infinity
        // literal), its NaN flag and its finite count.
        let mut partial = Shared::new_slice(units as usize);
        let mut nan = f32::new(0.0);
        let mut finite = f32::new(0.0);
        let mut best = f32::new(-3.0e38);
        let mut i = unit;
        while i < vocab {
            let value = f32::cast_from(logits[base + i]);
            if IsNan::is_nan(value) {
                nan = f32::new(1.0);
            } else if !IsInf::is_inf(value) {
                finite += f32::new(1.0);
                best = max(best, value);
            }
            i += stride;
        }
        partial[unit] = best;
        let best = reduce_max::<f32>(&mut partial);
        partial[unit] = nan;
        let nan = reduce_max::<f32>(&mut partial);
        partial[unit] = finite;
        let finite = reduce_sum::<f32>(&mut partial);

        // The softmax's sums at the row's temperature and at 1, shifted by the max as the
        // host does.
        let mut sum = f32::new(0.0);
        let mut sum_at_one = f32::new(0.0);
        let mut i = unit;
        while i < vocab {
            let value = f32::cast_from(logits[base + i]);
            if !IsNan::is_nan(value) && !IsInf::is_inf(value) {
                sum += ((value - best) / temperature).exp();
                sum_at_one += (value - best).exp();
            }
            i += stride;
        }
        partial[unit] = sum;
        let sum = reduce_sum::<f32>(&mut partial);
        partial[unit] = sum_at_one;
        let sum_at_one = reduce_sum::<f32>(&mut partial);

        // The largest threshold with at least `k` finite values at or above it: the k-th
        // largest value's key (0, below every finite key, where the row has fewer).
        let mut threshold = 0u32;
        let mut bit = 32u32;
        while bit > 0 {
            bit -= 1;
            let candidate = threshold | (1u32 << bit);
            let mut count = f32::new(0.0);
            let mut i = unit;
            while i < vocab {
                let value = f32::cast_from(logits[base + i]);
                if !IsNan::is_nan(value) && !IsInf::is_inf(value) && order_key(value) >= candidate {
                    count += f32::new(1.0);
                }
                i += stride;
            }
            partial[unit] = count;
            if reduce_sum::<f32>(&mut partial) >= f32::cast_from(k) {
                threshold = candidate;
            }
        }

        // Each unit's count above the threshold and at it, over its own range of ids.
        let span = vocab.div_ceil(stride);
        let start = min(unit * span, vocab);
        let end = min(start + span, vocab);
        let mut above = Shared::new_slice(units as usize);
        let mut at = Shared::new_slice(units as usize);
        let mut a = 0u32;
        let mut e = 0u32;
        for i in start..end {
            let value = f32::cast_from(logits[base + i]);
            if !IsNan::is_nan(value) && !IsInf::is_inf(value) {
                let key = order_key(value);
                if key > threshold {
                    a += 1;
                } else if key == threshold {
                    e += 1;
                }
            }
        }
        above[unit] = a;
        at[unit] = e;
        sync_cube();
        // Slots before this unit's: the units before it, and all values above for those at.
        let mut above_before = 0u32;
        let mut at_before = 0u32;
        let mut above_total = 0u32;
        for u in 0..stride {
            above_total += above[u];
            if u < unit {
                above_before += above[u];
                at_before += at[u];
            }
        }
        let mut slot_above = above_before as usize;
        let mut slot_at = (above_total + at_before) as usize;
        for i in start..end {
            let value = f32::cast_from(logits[base + i]);
            if !IsNan::is_nan(value) && !IsInf::is_inf(value) {
                let key = order_key(value);
                if key > threshold {
                    output[out + 4 + slot_above] = value;
                    output[out + 4 + k + slot_above] = f32::cast_from(i);
                    slot_above += 1;
                } else if key == threshold && slot_at < k {
                    output[out + 4 + slot_at] = value;
                    output[out + 4 + k + slot_at] = f32::cast_from(i);
                    slot_at += 1;
                }
            }
        }
        // The slots no finite value took (the offsets of `best_layout`, literal here).
        let filled = min(f32::cast_from(k), finite);
        let mut slot = unit;
        while slot < k {
            if f32::cast_from(slot) >= filled {
                output[out + 4 + slot] = f32::new(-3.0e38);
                output[out + 4 + k + slot] = f32::new(-1.0);
            }
            slot += stride;
        }
        if unit == 0 {
            output[out] = nan;
            output[out + 1] = sum;
            output[out + 2] = finite;
            output[out + 3] = sum_at_one;
        }
    }

    /// `value`'s bits as an unsigned number in the values' order: the sign flipped for
    /// positive values, every bit for negative ones (finite keys are never 0).
    #[cube]
    fn order_key(value: f32) -> u32 {
        let bits = u32::reinterpret(value);
        select(bits >> 31 == 1, !bits, bits | 0x8000_0000u32)
    }

    /// The sum of `partial` (one value per unit; the cube's size is a power of two), in every unit.
    #[cube]
    fn reduce_sum<F: Float>(partial: &mut Shared<[F]>) -> F {
        sync_cube();
        let unit = UNIT_POS_X as usize;
        // The cube's size at run time: a comptime value cannot be stepped in a loop.
        let mut half = CUBE_DIM_X as usize / 2;
        while half > 0 {
            if unit < half {
                let other = partial[unit + half];
                partial[unit] += other;
            }
            sync_cube();
            half /= 2;
        }
        let total = partial[0];
        // No unit may write its next partial before every unit has read this one's total.
        sync_cube();
        total
    }

    /// The max of `partial` (one value per unit; the cube's size is a power of two), in every unit.
    #[cube]
    fn reduce_max<F: Float>(partial: &mut Shared<[F]>) -> F {
        sync_cube();
        let unit = UNIT_POS_X as usize;
        // The cube's size at run time: a comptime value cannot be stepped in a loop.
        let mut half = CUBE_DIM_X as usize / 2;
        while half > 0 {
            if unit < half {
                let other = partial[unit + half];
                partial[unit] = max(partial[unit], other);
            }
            sync_cube();
            half /= 2;
        }
        let total = partial[0];
        sync_cube();
        total
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{DType, Device, Distribution, Tensor};

    use crate::DeviceChoice;

    /// The GPU (lavapipe in CI), or `None` where there is none and none is required.
    fn gpu() -> Option<Device> {
        match crate::device::select(DeviceChoice::Gpu(0), None) {
            Ok(selected) => Some(selected.device),
            Err(e) => {
                assert_ne!(
                    std::env::var("RBEE_GPU_TESTS").as_deref(),
                    Ok("required"),
                    "RBEE_GPU_TESTS=required, but {e}"
                );
                eprintln!("device_kernels tests SKIPPED: {e}");
                None
            }
        }
    }

    fn max_difference<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        let a = a.try_into_data().map_err(|e| format!("{e:?}")).unwrap();
        let b = b.into_data();
        let (a, b) = (
            a.try_into_vec::<f32>().unwrap(),
            b.try_into_vec::<f32>().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Both norms against Burn's add and `RmsNorm`, in f32 and cast to f16 as the
    /// projections take them, over rows narrower and wider than a cube.
    #[test]
    fn norms_are_burns_add_and_rms_norm() {
        let Some(device) = gpu() else { return };
        for [rows, h] in [[1, 576], [5, 64], [3, 2048], [2, 100]] {
            let x = Tensor::<2>::random([rows, h], Distribution::Normal(0.0, 2.0), &device);
            let delta = Tensor::<2>::random([rows, h], Distribution::Normal(0.0, 1.0), &device);
            let gamma = Tensor::<1>::random([h], Distribution::Normal(1.0, 0.5), &device);
            let norm = burn::nn::RmsNorm {
                gamma: burn::module::Param::from_tensor(gamma.clone()),
                epsilon: 1e-5,
            };
            for dtype in [DType::F32, DType::F16] {
                let normed = super::rms_norm(x.clone(), gamma.clone(), 1e-5, dtype);
                assert_eq!(normed.dtype(), dtype);
                let reference = norm.forward(x.clone());
                let difference = max_difference(normed.cast(DType::F32), reference);
                let tolerance = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                assert!(
                    difference < tolerance,
                    "[{rows}, {h}] {dtype:?}: {difference}"
                );

                let (sum, normed) =
                    super::add_rms_norm(x.clone(), delta.clone(), gamma.clone(), 1e-5, dtype);
                let reference_sum = x.clone() + delta.clone();
                assert_eq!(max_difference(sum, reference_sum.clone()), 0.0);
                let difference =
                    max_difference(normed.cast(DType::F32), norm.forward(reference_sum));
                assert!(
                    difference < tolerance,
                    "[{rows}, {h}] {dtype:?} add: {difference}"
                );
            }
        }
    }

    /// Against the host's argmax (the lowest id among equal values), over vocabularies
    /// narrower and wider than a cube, with ties planted, in f32 and f16; a row holding a
    /// NaN is flagged, whatever its other rows hold.
    #[test]
    fn greedy_tokens_are_the_most_likely_lowest_id_first() {
        let Some(device) = gpu() else { return };
        for [rows, vocab] in [[1, 5], [3, 200], [4, 49152]] {
            let logits =
                Tensor::<2>::random([rows, vocab], Distribution::Normal(0.0, 3.0), &device);
            let mut values = logits.into_data().try_to_vec::<f32>().unwrap();
            // A tie for the top in row 0: the id further on must lose.
            let best = values[..vocab].iter().cloned().fold(f32::MIN, f32::max) + 1.0;
            values[vocab - 1] = best;
            values[vocab / 2] = best;
            for dtype in [DType::F32, DType::F16] {
                let logits = Tensor::<2>::from_data(
                    burn::tensor::TensorData::new(values.clone(), [rows, vocab]),
                    &device,
                )
                .cast(dtype);
                let got: Vec<i64> = super::greedy_tokens(logits.clone())
                    .into_data()
                    .iter::<i64>()
                    .collect();
                let host = logits
                    .cast(DType::F32)
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap();
                let want: Vec<i64> = host
                    .chunks(vocab)
                    .map(|row| {
                        let top = row.iter().cloned().fold(f32::MIN, f32::max);
                        row.iter().position(|&x| x == top).unwrap() as i64
                    })
                    .collect();
                assert_eq!(got, want, "[{rows}, {vocab}] {dtype:?}");
                assert_eq!(got[0], (vocab / 2) as i64, "the lower of two equal ids");
            }
            let mut with_nan = values.clone();
            with_nan[(rows - 1) * vocab + vocab / 3] = f32::NAN;
            let logits = Tensor::<2>::from_data(
                burn::tensor::TensorData::new(with_nan, [rows, vocab]),
                &device,
            );
            let got: Vec<i64> = super::greedy_tokens(logits)
                .into_data()
                .iter::<i64>()
                .collect();
            assert_eq!(got[rows - 1], super::NAN_ROW, "[{rows}, {vocab}]");
            assert!(got[..rows - 1].iter().all(|&t| t >= 0));
        }
    }

    /// Against the host: each row's largest finite logits (the lowest ids first among
    /// equal ones at the cut), the softmax's sums at the row's temperature and at 1, the
    /// finite count; 256 and 2048 candidates, rows narrower than them, rows of many ties
    /// (values on a grid of 1/4),
    /// masked (-inf) logits, f32 and f16; a NaN flagged in its row alone.
    #[test]
    fn best_candidates_are_the_largest_logits_and_the_softmax_sum() {
        use super::{best_layout as at, candidates_for};
        let Some(device) = gpu() else { return };
        let rank = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        for [rows, vocab] in [[1, 100], [3, 5000], [2, 49152]] {
            let logits =
                Tensor::<2>::random([rows, vocab], Distribution::Normal(0.0, 3.0), &device);
            let mut values = logits.into_data().try_to_vec::<f32>().unwrap();
            for value in &mut values[..vocab] {
                *value = (*value * 4.0).round() / 4.0;
            }
            for i in (0..vocab).step_by(7) {
                values[(rows - 1) * vocab + i] = f32::NEG_INFINITY;
            }
            let temperatures: Vec<f32> = [0.7, 1.0, 2.0][..rows].to_vec();
            let k = candidates_for(vocab);
            let (width, ids) = (at::width(k), at::ids(k));
            for dtype in [DType::F32, DType::F16] {
                let logits = Tensor::<2>::from_data(
                    burn::tensor::TensorData::new(values.clone(), [rows, vocab]),
                    &device,
                )
                .cast(dtype);
                let temperatures_on_device = Tensor::<1>::from_data(
                    burn::tensor::TensorData::new(temperatures.clone(), [rows]),
                    &device,
                );
                let got = super::best_candidates(logits.clone(), temperatures_on_device, k)
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap();
                let host = logits
                    .cast(DType::F32)
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap();
                for row in 0..rows {
                    let figures = &got[row * width..][..width];
                    let mut ranked: Vec<(u32, f32)> = host[row * vocab..][..vocab]
                        .iter()
                        .enumerate()
                        .filter(|(_, l)| l.is_finite())
                        .map(|(i, &l)| (i as u32, l))
                        .collect();
                    ranked.sort_by(rank);
                    let finite = ranked.len();
                    let at_row = format!("[{rows}, {vocab}] {dtype:?} row {row}");
                    assert_eq!(figures[at::NAN], 0.0, "{at_row}");
                    assert_eq!(figures[at::FINITE] as usize, finite, "{at_row}");
                    let (max, t) = (ranked[0].1, temperatures[row]);
                    let sum: f64 = ranked
                        .iter()
                        .map(|&(_, l)| ((l - max) / t).exp() as f64)
                        .sum();
                    let difference = (figures[at::SUM] as f64 - sum).abs() / sum;
                    assert!(difference < 1e-5, "{at_row}: sum {difference}");
                    let sum: f64 = ranked.iter().map(|&(_, l)| (l - max).exp() as f64).sum();
                    let difference = (figures[at::SUM_AT_ONE] as f64 - sum).abs() / sum;
                    assert!(difference < 1e-5, "{at_row}: sum at 1 {difference}");
                    ranked.truncate(k);
                    let n = ranked.len();
                    let mut candidates: Vec<(u32, f32)> = figures[ids..][..n]
                        .iter()
                        .zip(&figures[at::VALUES..][..n])
                        .map(|(&id, &value)| (id as u32, value))
                        .collect();
                    candidates.sort_by(rank);
                    assert_eq!(candidates, ranked, "{at_row}");
                    assert!(
                        figures[ids + n..][..k - n].iter().all(|&id| id == -1.0),
                        "{at_row}: the empty slots"
                    );
                }
            }
            let mut with_nan = values.clone();
            with_nan[vocab / 3] = f32::NAN;
            let logits = Tensor::<2>::from_data(
                burn::tensor::TensorData::new(with_nan, [rows, vocab]),
                &device,
            );
            let temperatures = Tensor::<1>::ones([rows], &device);
            let got = super::best_candidates(logits, temperatures, k)
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let flags: Vec<f32> = got.chunks(width).map(|row| row[at::NAN]).collect();
            assert_eq!(flags[0], 1.0, "[{rows}, {vocab}]");
            assert!(flags[1..].iter().all(|&flag| flag == 0.0));
        }
    }

    /// Against the same attention in Burn's operations (keys and values gathered from their
    /// slots, a causal mask over the rows of a chunk), over a step of decode rows and prompt
    /// chunks of sequences whose blocks are scattered over the pools, and caches shorter and
    /// longer than a chunk of the kernel's.
    #[test]
    fn paged_attention_is_softmax_of_each_rows_visible_scores_times_values() {
        use crate::kv::{BLOCK_SIZE, BlockId};
        use crate::model::device_kv::{StepLayout, StepSequence};

        let Some(device) = gpu() else { return };
        for (nh, nkv, hd) in [(9, 3, 64), (4, 2, 16), (8, 8, 32)] {
            // (start, rows): decode rows, a chunk from 0, a chunk past 0, a long cache.
            let shapes: [(usize, usize); 5] = [(0, 1), (36, 1), (0, 20), (17, 9), (2400, 1)];
            let total_blocks: usize = shapes
                .iter()
                .map(|&(start, rows)| (start + rows).div_ceil(BLOCK_SIZE))
                .sum();
            // Each sequence's blocks, interleaved and reversed over the pools.
            let mut ids: Vec<BlockId> = (0..total_blocks as BlockId).rev().collect();
            ids.rotate_left(total_blocks / 3);
            let mut tables = Vec::new();
            let mut taken = 0;
            for &(start, rows) in &shapes {
                let n = (start + rows).div_ceil(BLOCK_SIZE);
                tables.push(ids[taken..taken + n].to_vec());
                taken += n;
            }
            let sequences: Vec<StepSequence<'_>> = shapes
                .iter()
                .zip(&tables)
                .map(|(&(start, rows), blocks)| StepSequence {
                    start,
                    rows,
                    blocks,
                })
                .collect();
            let layout = StepLayout::new(&sequences, &device);
            let rows = layout.rows();
            let normal = Distribution::Normal(0.0, 1.0);
            let slots = total_blocks * BLOCK_SIZE;
            let keys = Tensor::<4>::random([slots, nkv, 1, hd], normal, &device);
            let values = Tensor::<4>::random([slots, nkv, 1, hd], normal, &device);
            // q as the layers hand it over: a slice of the rotated q/k heads.
            let qk = Tensor::<4>::random([rows, nh + nkv, 1, hd], normal, &device);
            let q = qk.narrow(1, 0, nh);

            let ours = super::attend_paged(q.clone(), keys.clone(), values.clone(), &layout);
            let reference = layout.attend_by_gathering(q, &keys, &values);
            let difference = max_difference(ours, reference);
            assert!(difference < 1e-4, "{nh} {nkv} {hd}: {difference}");
        }
    }
}
