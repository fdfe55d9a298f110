//! A small executor for the ONNX convolutional networks the face detectors
//! ship as: `Conv` (any kernel, stride, padding, dilation and groups),
//! `ConvTranspose`, `BatchNormalization`, `Relu`, `Add` and `Sigmoid`, on one
//! image (`[1, C, H, W]`, f32).
//!
//! Why our own and not `tract-onnx`: on CenterFace at 640x480 (2-core AMD EPYC,
//! AVX-512), tract 0.21 took about 270 ms a frame, ten times ONNX Runtime's
//! 28 ms on the same cores, and too slow for a live detector. The network is
//! almost all 1x1 convolutions, which are plain matrix products, and 3x3
//! depthwise convolutions, which are memory-bound stencils; the first go to the
//! `gemm` crate (the one Candle uses) and the second to a direct loop, each
//! parallel on rayon's current pool. `cliper bench` times it beside rustface.
//!
//! The file is read with `prost` against the few messages of `onnx.proto`
//! that describe such a graph. At load, batch norms that follow a convolution
//! are folded into its weights and a `Relu` that is the only reader of its
//! input is fused into the op before it, so a forward pass is a list of
//! convolutions, adds and activations over numbered buffers, each buffer
//! freed after its last reader.

mod kernels;
mod onnx;

/// Largest stride, dilation or padding accepted: detectors use 1 to 4, and
/// a bound keeps a damaged file from asking for enormous feature maps.
pub(crate) const MAX_ATTR: i64 = 64;

/// Most values one feature map may hold (1 GiB of f32).
pub(crate) const MAX_MAP: usize = 1 << 28;

/// Errors from reading or running a network.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CnnError {
    #[error("{file}: not an ONNX model ({reason}); use the .onnx file the detector ships as")]
    Format { file: String, reason: String },
    #[error("{file}: unsupported ONNX graph: {reason}")]
    Unsupported { file: String, reason: String },
    #[error("{file}: tensor `{name}` is invalid: {reason}")]
    Tensor {
        file: String,
        name: String,
        reason: String,
    },
    #[error("input of {got:?} does not fit the network: {expected}")]
    Input {
        got: [usize; 3],
        expected: &'static str,
    },
}

/// A feature map of one image: `[c, h, w]`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureMap {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

impl FeatureMap {
    pub fn zeros(c: usize, h: usize, w: usize) -> Self {
        Self {
            c,
            h,
            w,
            data: vec![0.0; c * h * w],
        }
    }

    /// Plane `ch` (`h * w` values).
    pub fn plane(&self, ch: usize) -> &[f32] {
        let n = self.h * self.w;
        &self.data[ch * n..(ch + 1) * n]
    }
}

/// A convolution (or transposed convolution) with its batch norm folded in.
#[derive(Clone, Debug)]
struct Conv {
    /// `[out, in / groups, kh, kw]` for `Conv`; `[in, out / groups, kh, kw]`
    /// for `ConvTranspose`, as ONNX stores them.
    weight: Vec<f32>,
    bias: Vec<f32>,
    in_ch: usize,
    out_ch: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    /// Top, left, bottom, right.
    pads: [usize; 4],
    dilation: [usize; 2],
    groups: usize,
    /// Extra rows and columns at the end of a transposed convolution's output.
    output_padding: [usize; 2],
    transposed: bool,
    relu: bool,
}

/// A MobileNet inverted residual's expansion (a 1x1 convolution, or the
/// network's first, strided one), its depthwise convolution and, where one
/// follows, its 1x1 projection, run a block of expanded channels at a time
/// so that neither the expanded map (six times the block's input) nor the
/// depthwise one is ever held whole. On a 1080p still CenterFace's first
/// expansion alone is 200 MB, and on a 12 MP photo it is over the 1 GiB
/// feature-map cap.
#[derive(Clone, Debug)]
struct Inverted {
    expand: Conv,
    depthwise: Conv,
    project: Option<Conv>,
}

#[derive(Clone, Debug)]
enum Op {
    Conv(Conv),
    Inverted(Box<Inverted>),
    /// `y = x * scale + shift` per channel, for a norm no convolution feeds.
    Affine {
        scale: Vec<f32>,
        shift: Vec<f32>,
        relu: bool,
    },
    Add {
        relu: bool,
    },
    Relu,
    Sigmoid,
}

impl Op {
    fn conv(&self) -> Option<&Conv> {
        match self {
            Op::Conv(c) => Some(c),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
struct Step {
    op: Op,
    inputs: Vec<usize>,
    output: usize,
    /// Buffers whose last reader this step is.
    frees: Vec<usize>,
}

/// A loaded network, ready to run on images of any size its strides divide.
#[derive(Clone, Debug)]
pub struct Network {
    steps: Vec<Step>,
    input: usize,
    input_channels: usize,
    outputs: Vec<usize>,
    buffers: usize,
}

impl Network {
    /// How many steps read buffer `b` (the graph outputs count as readers).
    fn readers(&self, b: usize) -> usize {
        self.steps.iter().filter(|s| s.inputs.contains(&b)).count()
            + self.outputs.iter().filter(|&&o| o == b).count()
    }

    /// Folds batch norms into the convolution before them and fuses a `Relu`
    /// into the op before it, where that op's output has no other reader.
    fn fuse(&mut self) {
        let mut i = 0;
        while i < self.steps.len() {
            let (input, folds) = {
                let s = &self.steps[i];
                let Some(&input) = s.inputs.first() else {
                    i += 1;
                    continue;
                };
                let folds = matches!(s.op, Op::Affine { .. } | Op::Relu) && input != 0;
                (input, folds)
            };
            if !folds || self.readers(input) != 1 {
                i += 1;
                continue;
            }
            let Some(p) = self.steps[..i].iter().rposition(|s| s.output == input) else {
                i += 1;
                continue;
            };
            let step = self.steps[i].clone();
            let fused = match (&mut self.steps[p].op, &step.op) {
                (Op::Conv(c), Op::Affine { scale, shift, .. }) if !c.relu => {
                    c.fold_affine(scale, shift);
                    true
                }
                (Op::Conv(Conv { relu, .. }), Op::Relu)
                | (Op::Add { relu }, Op::Relu)
                | (Op::Affine { relu, .. }, Op::Relu)
                    if !*relu =>
                {
                    *relu = true;
                    true
                }
                _ => false,
            };
            if fused {
                // The fused op now writes the later op's buffer.
                self.steps[p].output = step.output;
                self.steps.remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// Fuses each ungrouped convolution whose only reader is a depthwise
    /// convolution, and the 1x1 convolution that is the depthwise one's only
    /// reader, into an [`Inverted`] step at the expansion's place (the
    /// fused steps read nothing else, so running them earlier is the same).
    fn fuse_inverted(&mut self) {
        let mut i = 0;
        while i < self.steps.len() {
            let Some(j) = self.sole_conv_reader(i, |c| c.is_depthwise()) else {
                i += 1;
                continue;
            };
            let expand_ok = matches!(&self.steps[i].op, Op::Conv(e) if e.is_full()
                && self.steps[j].op.conv().is_some_and(|d| d.in_ch == e.out_ch));
            if !expand_ok {
                i += 1;
                continue;
            }
            let k = self.sole_conv_reader(j, |c| c.is_pointwise());
            let take = |s: &mut Step| match std::mem::replace(&mut s.op, Op::Relu) {
                Op::Conv(c) => c,
                _ => unreachable!("checked to be a convolution"),
            };
            let project = k.map(|k| take(&mut self.steps[k]));
            let depthwise = take(&mut self.steps[j]);
            let output = k.map_or(self.steps[j].output, |k| self.steps[k].output);
            let expand = take(&mut self.steps[i]);
            self.steps[i].op = Op::Inverted(Box::new(Inverted {
                expand,
                depthwise,
                project,
            }));
            self.steps[i].output = output;
            // Remove the later steps, the last first.
            if let Some(k) = k {
                self.steps.remove(k);
            }
            self.steps.remove(j);
            i += 1;
        }
    }

    /// The step that is the only reader of step `i`'s output, where it is a
    /// convolution that `fits` and reads nothing else.
    fn sole_conv_reader(&self, i: usize, fits: impl Fn(&Conv) -> bool) -> Option<usize> {
        let out = self.steps[i].output;
        if self.readers(out) != 1 {
            return None;
        }
        let j = i
            + 1
            + self.steps[i + 1..]
                .iter()
                .position(|s| s.inputs.contains(&out))?;
        let s = &self.steps[j];
        (s.inputs == [out] && s.op.conv().is_some_and(&fits)).then_some(j)
    }

    fn plan_frees(&mut self) {
        let mut last = vec![None; self.buffers];
        for (i, s) in self.steps.iter().enumerate() {
            for &b in &s.inputs {
                last[b] = Some(i);
            }
        }
        for (b, l) in last.into_iter().enumerate() {
            if let Some(i) = l {
                if !self.outputs.contains(&b) {
                    self.steps[i].frees.push(b);
                }
            }
        }
    }

    /// How many fused [`Inverted`] steps the network runs.
    #[cfg(test)]
    pub(crate) fn inverted_steps(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s.op, Op::Inverted(_)))
            .count()
    }

    /// Channels of the image the network reads.
    pub fn input_channels(&self) -> usize {
        self.input_channels
    }

    /// Runs the network on one image; the outputs come in the graph's order.
    pub fn run(&self, input: FeatureMap) -> Result<Vec<FeatureMap>, CnnError> {
        self.run_with(input, &mut Workspace::default())
    }

    /// [`run`](Self::run), reusing the buffers of earlier runs kept in `ws`.
    pub fn run_with(
        &self,
        input: FeatureMap,
        ws: &mut Workspace,
    ) -> Result<Vec<FeatureMap>, CnnError> {
        if input.c != self.input_channels || input.h == 0 || input.w == 0 {
            return Err(CnnError::Input {
                got: [input.c, input.h, input.w],
                expected: "the network's input channels and a non-empty image",
            });
        }
        let mut buffers: Vec<Option<FeatureMap>> = vec![None; self.buffers];
        buffers[self.input] = Some(input);
        for s in &self.steps {
            let get = |k: usize| buffers[s.inputs[k]].as_ref().expect("planned buffer");
            let map = |ws: &mut Workspace, x: &FeatureMap, f: &dyn Fn(usize, f32) -> f32| {
                let mut y = ws.map(x.c, x.h, x.w);
                let n = x.h * x.w;
                for (i, (v, &u)) in y.data.iter_mut().zip(&x.data).enumerate() {
                    *v = f(i / n.max(1), u);
                }
                y
            };
            let out = match &s.op {
                Op::Conv(c) => c.run(get(0), ws)?,
                Op::Inverted(f) => f.run(get(0), ws)?,
                Op::Affine { scale, shift, relu } => map(ws, get(0), &|ch, v| {
                    let v = v * scale[ch] + shift[ch];
                    if *relu {
                        v.max(0.0)
                    } else {
                        v
                    }
                }),
                Op::Add { relu } => {
                    let (a, b) = (get(0), get(1));
                    if (a.c, a.h, a.w) != (b.c, b.h, b.w) {
                        return Err(CnnError::Input {
                            got: [b.c, b.h, b.w],
                            expected:
                                "a size whose every stride divides it (the detector pads to 32)",
                        });
                    }
                    let mut y = ws.map(a.c, a.h, a.w);
                    for ((v, &p), &q) in y.data.iter_mut().zip(&a.data).zip(&b.data) {
                        *v = if *relu { (p + q).max(0.0) } else { p + q };
                    }
                    y
                }
                Op::Relu => map(ws, get(0), &|_, v| v.max(0.0)),
                Op::Sigmoid => map(ws, get(0), &|_, v| 1.0 / (1.0 + (-v).exp())),
            };
            for &b in &s.frees {
                if let Some(m) = buffers[b].take() {
                    ws.give(m.data);
                }
            }
            buffers[s.output] = Some(out);
        }
        Ok(self
            .outputs
            .iter()
            .map(|&o| buffers[o].take().expect("outputs are kept"))
            .collect())
    }
}

/// Buffers kept between runs. Fresh allocations of feature-map size are
/// returned to the OS on free and page-fault on first touch, which on the
/// 2-core VM cost as much as the arithmetic of the largest convolutions.
/// The kept buffers are capped in bytes as well as in number: a full-size
/// 1080p still has 67 MB feature maps, and keeping 16 of them added 425 MB
/// to `cliper bench`'s peak memory; the live 320 px maps (2-3 MB) fit.
#[derive(Debug)]
pub struct Workspace {
    free: Vec<Vec<f32>>,
    /// Most values of expanded map an [`Inverted`] step holds at once.
    pub(super) expanded_block: usize,
    /// Most values of an im2col matrix built at once.
    pub(super) im2col: usize,
}

impl Default for Workspace {
    fn default() -> Self {
        Self {
            free: Vec::new(),
            // 16 MiB of f32 each: the live detector's maps fit whole; a
            // 1080p still's first expansion (96 x 544 x 960) goes 8
            // channels at a time, its first convolution's im2col matrix
            // (27 x 544 x 960) in 6 bands of rows.
            expanded_block: 4 << 20,
            im2col: 4 << 20,
        }
    }
}

impl Workspace {
    /// Most buffers kept: a MobileNet's widest point holds a handful alive.
    const KEEP: usize = 16;
    /// Most values kept in all (32 MiB of f32).
    const KEEP_VALUES: usize = 8 << 20;

    /// A workspace that holds at most `values` of an expanded map or an
    /// im2col matrix at once (tests: a small image through the banded paths).
    #[cfg(test)]
    pub(crate) fn with_budget(values: usize) -> Self {
        Self {
            expanded_block: values.max(1),
            im2col: values.max(1),
            ..Self::default()
        }
    }

    /// A buffer of `len` values, stale where it was used before: every
    /// caller writes each value before it reads it (im2col fills its
    /// padding, the convolutions start from their bias or overwrite, the
    /// elementwise steps map every value). Zeroing them was 8.7% of the
    /// detector's time in `cliper run` on a 720p file (`perf`, 2-core
    /// EPYC). Test: `a_reused_workspace_gives_the_maps_of_a_fresh_one`.
    fn take(&mut self, len: usize) -> Vec<f32> {
        let best = self
            .free
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        let mut v = match best {
            Some(i) => self.free.swap_remove(i),
            None => Vec::with_capacity(len),
        };
        // Only values beyond the buffer's old length are cleared.
        v.resize(len, 0.0);
        v
    }

    fn map(&mut self, c: usize, h: usize, w: usize) -> FeatureMap {
        FeatureMap {
            c,
            h,
            w,
            data: self.take(c * h * w),
        }
    }

    fn give(&mut self, v: Vec<f32>) {
        if v.capacity() == 0 {
            return;
        }
        self.free.push(v);
        if self.free.len() > Self::KEEP {
            // Drop the smallest.
            if let Some(i) = (0..self.free.len()).min_by_key(|&i| self.free[i].capacity()) {
                self.free.swap_remove(i);
            }
        }
        // Over the byte cap, drop the largest (the ones a still adds).
        while self.free.iter().map(Vec::capacity).sum::<usize>() > Self::KEEP_VALUES {
            match (0..self.free.len()).max_by_key(|&i| self.free[i].capacity()) {
                Some(i) => drop(self.free.swap_remove(i)),
                None => break,
            }
        }
    }
}
