//! A cache-blocked GEMM, `C += A·B`, shared by MatMul, Gemm and the convolutions.
//!
//! A and B are read through strides (so transposes cost nothing extra); blocks of them are packed
//! into contiguous panels, and a register-tile micro-kernel written as plain loops over fixed-size
//! arrays is auto-vectorized by LLVM. On x86-64 with AVX2+FMA (checked at run time) the same code
//! is compiled a second time with those features and a larger tile.

use super::Real;

/// A read-only strided matrix view: element `(i, j)` is `data[off + i*rs + j*cs]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a, T> {
    pub data: &'a [T],
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T: Copy> MatRef<'a, T> {
    /// A row-major matrix with `cols` columns starting at `off`.
    pub fn rows(data: &'a [T], off: usize, cols: usize) -> Self {
        MatRef { data, off, rs: cols, cs: 1 }
    }
    /// The transpose of this view.
    pub fn t(self) -> Self {
        MatRef { rs: self.cs, cs: self.rs, ..self }
    }
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> T {
        self.data[self.off + i * self.rs + j * self.cs]
    }
}

const KC: usize = 256;
const MC: usize = 96;
const NC: usize = 2048;

/// `C[m×n] += A[m×k] · B[k×n]`, where row `i` of C starts at `c[i*ldc]`.
///
/// The views must cover their matrices (callers derive them from checked shapes).
pub(crate) fn gemm<T: Real>(m: usize, n: usize, k: usize, a: MatRef<T>, b: MatRef<T>, c: &mut [T], ldc: usize) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function is compiled with.
            unsafe { gemm_avx2(m, n, k, a, b, c, ldc) };
            return;
        }
    }
    gemm_blocked::<T, 4, 8, false>(m, n, k, a, b, c, ldc);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemm_avx2<T: Real>(m: usize, n: usize, k: usize, a: MatRef<T>, b: MatRef<T>, c: &mut [T], ldc: usize) {
    if std::mem::size_of::<T>() == 4 {
        gemm_blocked::<T, 6, 16, true>(m, n, k, a, b, c, ldc);
    } else {
        gemm_blocked::<T, 6, 8, true>(m, n, k, a, b, c, ldc);
    }
}

#[inline(always)]
fn gemm_blocked<T: Real, const MR: usize, const NR: usize, const FMA: bool>(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<T>,
    b: MatRef<T>,
    c: &mut [T],
    ldc: usize,
) {
    let mut bpack: Vec<T> = Vec::new();
    let mut apack: Vec<T> = Vec::new();
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        let npanels = nc.div_ceil(NR);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            pack_b::<T, NR>(&b, pc, kc, jc, nc, &mut bpack);
            for ic in (0..m).step_by(MC) {
                let mc = MC.min(m - ic);
                pack_a::<T, MR>(&a, ic, mc, pc, kc, &mut apack);
                for jp in 0..npanels {
                    let bp = &bpack[jp * kc * NR..(jp + 1) * kc * NR];
                    let j0 = jc + jp * NR;
                    let nr = NR.min(n - j0);
                    for ip in 0..mc.div_ceil(MR) {
                        let ap = &apack[ip * kc * MR..(ip + 1) * kc * MR];
                        let i0 = ic + ip * MR;
                        let mr = MR.min(m - i0);
                        let acc = micro::<T, MR, NR, FMA>(ap, bp);
                        for (i, row) in acc.iter().enumerate().take(mr) {
                            let dst = &mut c[(i0 + i) * ldc + j0..(i0 + i) * ldc + j0 + nr];
                            for (d, &v) in dst.iter_mut().zip(row) {
                                *d += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

#[inline(always)]
fn micro<T: Real, const MR: usize, const NR: usize, const FMA: bool>(a: &[T], b: &[T]) -> [[T; NR]; MR] {
    let mut acc = [[T::ZERO; NR]; MR];
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        for i in 0..MR {
            let x = ap[i];
            for j in 0..NR {
                acc[i][j] = if FMA { x.mul_add(bp[j], acc[i][j]) } else { acc[i][j] + x * bp[j] };
            }
        }
    }
    acc
}

/// Packs `B[pc..pc+kc, jc..jc+nc]` into panels of `NR` columns (zero-padded), each `kc×NR` row-major.
#[inline(always)]
fn pack_b<T: Real, const NR: usize>(b: &MatRef<T>, pc: usize, kc: usize, jc: usize, nc: usize, out: &mut Vec<T>) {
    let npanels = nc.div_ceil(NR);
    out.clear();
    out.resize(npanels * kc * NR, T::ZERO);
    for jp in 0..npanels {
        let j0 = jc + jp * NR;
        let nr = NR.min(jc + nc - j0);
        let panel = &mut out[jp * kc * NR..(jp + 1) * kc * NR];
        if b.cs == 1 {
            for (p, dst) in panel.chunks_exact_mut(NR).enumerate() {
                let s = b.off + (pc + p) * b.rs + j0;
                dst[..nr].copy_from_slice(&b.data[s..s + nr]);
            }
        } else {
            for (p, dst) in panel.chunks_exact_mut(NR).enumerate() {
                for (j, d) in dst.iter_mut().enumerate().take(nr) {
                    *d = b.at(pc + p, j0 + j);
                }
            }
        }
    }
}

/// Packs `A[ic..ic+mc, pc..pc+kc]` into panels of `MR` rows (zero-padded), each `kc×MR` column-major.
#[inline(always)]
fn pack_a<T: Real, const MR: usize>(a: &MatRef<T>, ic: usize, mc: usize, pc: usize, kc: usize, out: &mut Vec<T>) {
    let npanels = mc.div_ceil(MR);
    out.clear();
    out.resize(npanels * kc * MR, T::ZERO);
    for ip in 0..npanels {
        let i0 = ic + ip * MR;
        let mr = MR.min(ic + mc - i0);
        let panel = &mut out[ip * kc * MR..(ip + 1) * kc * MR];
        for i in 0..mr {
            if a.cs == 1 {
                let s = a.off + (i0 + i) * a.rs + pc;
                for (p, &v) in a.data[s..s + kc].iter().enumerate() {
                    panel[p * MR + i] = v;
                }
            } else {
                for p in 0..kc {
                    panel[p * MR + i] = a.at(i0 + i, pc + p);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    c[i * n + j] += a[i * k + p] * b[p * n + j];
                }
            }
        }
        c
    }

    #[test]
    fn matches_naive_on_ragged_sizes() {
        for &(m, n, k) in &[(1, 1, 1), (7, 13, 5), (100, 37, 300), (5, 2100, 3)] {
            let a: Vec<f64> = (0..m * k).map(|i| ((i * 7) % 11) as f64 - 5.0).collect();
            let b: Vec<f64> = (0..k * n).map(|i| ((i * 3) % 13) as f64 - 6.0).collect();
            let want = naive(m, n, k, &a, &b);
            let mut c = vec![0.0f64; m * n];
            gemm(m, n, k, MatRef::rows(&a, 0, k), MatRef::rows(&b, 0, n), &mut c, n);
            assert_eq!(c, want);
            let af: Vec<f32> = a.iter().map(|&x| x as f32).collect();
            // B transposed: stored n×k.
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k] as f32).collect();
            let mut cf = vec![0.0f32; m * n];
            gemm(m, n, k, MatRef::rows(&af, 0, k), MatRef::rows(&bt, 0, k).t(), &mut cf, n);
            assert!(cf.iter().zip(&want).all(|(&x, &y)| (x as f64 - y).abs() < 1e-3));
        }
    }
}
