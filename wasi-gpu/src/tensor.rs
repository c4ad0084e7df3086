//! What `lode:gpu` calls talk about, whatever the backend: dtypes, tensor views of buffers,
//! the op set, errors, and the shape checks every backend relies on (a backend only ever
//! sees views that fit their buffers and shapes that fit their op).

/// Element types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }
}

/// What went wrong, as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// No backend can serve the call here.
    Unavailable,
    /// The device has no room left.
    OutOfMemory,
    /// The function's quota would be passed.
    QuotaExceeded,
    /// Shapes that do not fit the op, or a view past its buffer's end.
    BadShape,
    /// Any other argument that is not valid.
    BadArgument,
    /// A kernel failed.
    KernelFailed,
}

/// An error the guest can handle: a code and what to do about it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct GpuError {
    /// The kind.
    pub code: ErrorCode,
    /// What was wrong, and what to do.
    pub message: String,
}

impl GpuError {
    /// An error of `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A [`ErrorCode::BadShape`].
    pub fn shape(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadShape, message)
    }

    /// A [`ErrorCode::BadArgument`].
    pub fn argument(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadArgument, message)
    }
}

/// A dense row-major view: `shape` elements of `dtype`, `offset` bytes into a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The element type.
    pub dtype: DType,
    /// Dimensions, outermost first.
    pub shape: Vec<u32>,
    /// Where it starts in its buffer, in bytes (a multiple of the dtype's size).
    pub offset: u64,
}

impl Layout {
    /// A view of `shape` f32 elements at the start of a buffer.
    pub fn f32(shape: &[u32]) -> Self {
        Self {
            dtype: DType::F32,
            shape: shape.to_vec(),
            offset: 0,
        }
    }

    /// Its element count.
    pub fn elements(&self) -> u64 {
        self.shape.iter().map(|&d| u64::from(d)).product()
    }

    /// Its size in bytes.
    pub fn bytes(&self) -> u64 {
        self.elements() * self.dtype.size()
    }

    /// Its first element's index in a buffer of its dtype.
    pub fn first(&self) -> usize {
        (self.offset / self.dtype.size()) as usize
    }

    /// Refuses a view that is misaligned or runs past a buffer of `buffer_size` bytes.
    pub fn check(&self, buffer_size: u64, what: &str) -> Result<(), GpuError> {
        if !self.offset.is_multiple_of(self.dtype.size()) {
            return Err(GpuError::argument(format!(
                "{what}: offset {} is not a multiple of the {:?} element size {}",
                self.offset,
                self.dtype,
                self.dtype.size()
            )));
        }
        let end = self
            .shape
            .iter()
            .try_fold(self.dtype.size(), |n, &d| n.checked_mul(u64::from(d)))
            .and_then(|bytes| bytes.checked_add(self.offset));
        match end {
            Some(end) if end <= buffer_size => Ok(()),
            _ => Err(GpuError::shape(format!(
                "{what}: shape {:?} of {:?} at offset {} runs past the end of its {buffer_size}-byte buffer",
                self.shape, self.dtype, self.offset
            ))),
        }
    }
}

/// The ops, with their own arguments.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    /// `out = op(a) x op(b)`, batched over leading dimensions.
    Matmul {
        /// Read `a` as [k, m].
        transpose_a: bool,
        /// Read `b` as [n, k].
        transpose_b: bool,
    },
    /// `out = a + b`.
    Add,
    /// `out = a * b`.
    Mul,
    /// `out = a * factor`.
    Scale(f32),
    /// `out = max(a, 0)`.
    Relu,
    /// `out = gelu(a)` (tanh approximation).
    Gelu,
    /// Softmax along an axis.
    Softmax {
        /// The axis.
        axis: u32,
    },
    /// Layer normalization over the last axis, with `gamma` and `beta`.
    LayerNorm {
        /// Added to the variance.
        eps: f32,
    },
    /// Sum along an axis, which `out` lacks.
    Sum {
        /// The axis.
        axis: u32,
    },
}

impl Op {
    /// How many input tensors it takes.
    pub fn inputs(self) -> usize {
        match self {
            Op::Matmul { .. } | Op::Add | Op::Mul => 2,
            Op::LayerNorm { .. } => 3,
            Op::Scale(_) | Op::Relu | Op::Gelu | Op::Softmax { .. } | Op::Sum { .. } => 1,
        }
    }
}

/// A matmul's sizes: `batch` products of [m, k] x [k, n].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatmulDims {
    /// Products.
    pub batch: usize,
    /// Rows of the result.
    pub m: usize,
    /// The shared dimension.
    pub k: usize,
    /// Columns of the result.
    pub n: usize,
}

/// An axis op's sizes: `outer` runs of `len` elements `inner` apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AxisDims {
    /// Elements before the axis, multiplied.
    pub outer: usize,
    /// The axis's length.
    pub len: usize,
    /// Elements after the axis, multiplied.
    pub inner: usize,
}

/// Checks that `inputs` and `out` fit `op` (dtypes agree, shapes fit); the sizes a backend
/// needs to run it.
pub fn check_op(op: Op, inputs: &[&Layout], out: &Layout) -> Result<Shape, GpuError> {
    if inputs.len() != op.inputs() {
        return Err(GpuError::argument(format!(
            "{op:?} takes {} inputs, not {}",
            op.inputs(),
            inputs.len()
        )));
    }
    if let Some(other) = inputs.iter().find(|l| l.dtype != out.dtype) {
        return Err(GpuError::argument(format!(
            "{op:?}: an input is {:?} and the output {:?}; ops do not convert dtypes",
            other.dtype, out.dtype
        )));
    }
    let a = inputs[0];
    let same = |what: &str, l: &Layout| {
        if l.shape == a.shape {
            Ok(())
        } else {
            Err(GpuError::shape(format!(
                "{op:?}: {what} has shape {:?}, the input {:?}",
                l.shape, a.shape
            )))
        }
    };
    match op {
        Op::Matmul {
            transpose_a,
            transpose_b,
        } => matmul_dims(a, inputs[1], out, transpose_a, transpose_b).map(Shape::Matmul),
        Op::Add | Op::Mul => {
            same("the second input", inputs[1])?;
            same("the output", out)?;
            Ok(Shape::Elementwise(a.elements() as usize))
        }
        Op::Scale(_) | Op::Relu | Op::Gelu => {
            same("the output", out)?;
            Ok(Shape::Elementwise(a.elements() as usize))
        }
        Op::Softmax { axis } => {
            same("the output", out)?;
            axis_dims(a, axis).map(Shape::Axis)
        }
        Op::LayerNorm { .. } => {
            same("the output", out)?;
            let last =
                a.shape.len().checked_sub(1).ok_or_else(|| {
                    GpuError::shape("LayerNorm needs at least one axis".to_string())
                })?;
            for (what, l) in [("gamma", inputs[1]), ("beta", inputs[2])] {
                if l.shape != [a.shape[last]] {
                    return Err(GpuError::shape(format!(
                        "LayerNorm: {what} has shape {:?}, not [{}] (the last axis)",
                        l.shape, a.shape[last]
                    )));
                }
            }
            axis_dims(a, last as u32).map(Shape::Axis)
        }
        Op::Sum { axis } => {
            let dims = axis_dims(a, axis)?;
            let mut expected = a.shape.clone();
            expected.remove(axis as usize);
            if out.shape != expected {
                return Err(GpuError::shape(format!(
                    "Sum along axis {axis} of {:?} gives {expected:?}, not {:?}",
                    a.shape, out.shape
                )));
            }
            Ok(Shape::Axis(dims))
        }
    }
}

/// The sizes [`check_op`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A matmul.
    Matmul(MatmulDims),
    /// This many elements, one by one.
    Elementwise(usize),
    /// Along one axis.
    Axis(AxisDims),
}

fn axis_dims(a: &Layout, axis: u32) -> Result<AxisDims, GpuError> {
    let axis = axis as usize;
    if axis >= a.shape.len() {
        return Err(GpuError::argument(format!(
            "axis {axis} is out of range for shape {:?}",
            a.shape
        )));
    }
    let product = |dims: &[u32]| dims.iter().map(|&d| d as usize).product::<usize>();
    Ok(AxisDims {
        outer: product(&a.shape[..axis]),
        len: a.shape[axis] as usize,
        inner: product(&a.shape[axis + 1..]),
    })
}

fn matmul_dims(
    a: &Layout,
    b: &Layout,
    out: &Layout,
    transpose_a: bool,
    transpose_b: bool,
) -> Result<MatmulDims, GpuError> {
    let rank = a.shape.len();
    if rank < 2 || b.shape.len() != rank || out.shape.len() != rank {
        return Err(GpuError::shape(format!(
            "matmul takes tensors of the same rank, at least 2: {:?} x {:?} -> {:?}",
            a.shape, b.shape, out.shape
        )));
    }
    let batch = &a.shape[..rank - 2];
    if &b.shape[..rank - 2] != batch || &out.shape[..rank - 2] != batch {
        return Err(GpuError::shape(format!(
            "matmul: the batch dimensions differ: {:?} x {:?} -> {:?}",
            a.shape, b.shape, out.shape
        )));
    }
    let two = |l: &Layout, t: bool| {
        let (r, c) = (l.shape[rank - 2] as usize, l.shape[rank - 1] as usize);
        if t { (c, r) } else { (r, c) }
    };
    let (m, k) = two(a, transpose_a);
    let (kb, n) = two(b, transpose_b);
    if k != kb || out.shape[rank - 2] as usize != m || out.shape[rank - 1] as usize != n {
        return Err(GpuError::shape(format!(
            "matmul: [{m}, {k}] x [{kb}, {n}] (after transposes) does not give the output's {:?}",
            out.shape
        )));
    }
    Ok(MatmulDims {
        batch: batch.iter().map(|&d| d as usize).product(),
        m,
        k,
        n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_must_fit_their_buffers_and_align() {
        let view = Layout::f32(&[4, 4]);
        assert!(view.check(64, "a").is_ok());
        assert_eq!(view.check(60, "a").unwrap_err().code, ErrorCode::BadShape);
        let shifted = Layout {
            offset: 2,
            ..view.clone()
        };
        assert_eq!(
            shifted.check(1 << 20, "a").unwrap_err().code,
            ErrorCode::BadArgument
        );
        // A shape whose size overflows is past any end, not a wrapped small one.
        let huge = Layout::f32(&[u32::MAX, u32::MAX, u32::MAX]);
        assert_eq!(
            huge.check(u64::MAX, "a").unwrap_err().code,
            ErrorCode::BadShape
        );
    }

    #[test]
    fn op_shapes_are_checked_before_any_backend_sees_them() {
        let l = Layout::f32;
        let mm = Op::Matmul {
            transpose_a: false,
            transpose_b: true,
        };
        assert_eq!(
            check_op(mm, &[&l(&[2, 3, 5]), &l(&[2, 7, 5])], &l(&[2, 3, 7])).unwrap(),
            Shape::Matmul(MatmulDims {
                batch: 2,
                m: 3,
                k: 5,
                n: 7
            })
        );
        let err = check_op(mm, &[&l(&[3, 5]), &l(&[5, 7])], &l(&[3, 7])).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadShape, "{err}");
        assert_eq!(
            check_op(Op::Sum { axis: 1 }, &[&l(&[2, 3, 4])], &l(&[2, 4])).unwrap(),
            Shape::Axis(AxisDims {
                outer: 2,
                len: 3,
                inner: 4
            })
        );
        let err = check_op(Op::Softmax { axis: 3 }, &[&l(&[2, 3])], &l(&[2, 3])).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadArgument);
        let half = Layout {
            dtype: DType::F16,
            ..l(&[4])
        };
        let err = check_op(Op::Add, &[&l(&[4]), &half], &l(&[4])).unwrap_err();
        assert!(err.message.contains("do not convert"), "{err}");
        let err = check_op(
            Op::LayerNorm { eps: 1e-5 },
            &[&l(&[2, 4]), &l(&[4]), &l(&[3])],
            &l(&[2, 4]),
        )
        .unwrap_err();
        assert!(err.message.contains("beta"), "{err}");
    }
}
