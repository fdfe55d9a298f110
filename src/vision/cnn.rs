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

use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;

/// Largest stride, dilation or padding accepted: detectors use 1 to 4, and
/// a bound keeps a damaged file from asking for enormous feature maps.
const MAX_ATTR: i64 = 64;

/// Most values one feature map may hold (1 GiB of f32).
const MAX_MAP: usize = 1 << 28;

/// Errors from reading or running a network.
#[derive(Debug, thiserror::Error)]
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

/// The subset of `onnx.proto` (v3+, proto2 syntax) that a convolutional graph
/// needs; unknown fields are skipped by prost.
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelProto {
        #[prost(message, optional, tag = "7")]
        pub graph: Option<GraphProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GraphProto {
        #[prost(message, repeated, tag = "1")]
        pub node: Vec<NodeProto>,
        #[prost(message, repeated, tag = "5")]
        pub initializer: Vec<TensorProto>,
        #[prost(message, repeated, tag = "11")]
        pub input: Vec<ValueInfoProto>,
        #[prost(message, repeated, tag = "12")]
        pub output: Vec<ValueInfoProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NodeProto {
        #[prost(string, repeated, tag = "1")]
        pub input: Vec<String>,
        #[prost(string, repeated, tag = "2")]
        pub output: Vec<String>,
        #[prost(string, tag = "3")]
        pub name: String,
        #[prost(string, tag = "4")]
        pub op_type: String,
        #[prost(message, repeated, tag = "5")]
        pub attribute: Vec<AttributeProto>,
        #[prost(string, tag = "7")]
        pub domain: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AttributeProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(float, tag = "2")]
        pub f: f32,
        #[prost(int64, tag = "3")]
        pub i: i64,
        #[prost(bytes = "vec", tag = "4")]
        pub s: Vec<u8>,
        #[prost(int64, repeated, tag = "8")]
        pub ints: Vec<i64>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorProto {
        #[prost(int64, repeated, tag = "1")]
        pub dims: Vec<i64>,
        #[prost(int32, tag = "2")]
        pub data_type: i32,
        #[prost(float, repeated, tag = "4")]
        pub float_data: Vec<f32>,
        #[prost(int64, repeated, tag = "7")]
        pub int64_data: Vec<i64>,
        #[prost(string, tag = "8")]
        pub name: String,
        #[prost(bytes = "vec", tag = "9")]
        pub raw_data: Vec<u8>,
        #[prost(int32, tag = "14")]
        pub data_location: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueInfoProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "2")]
        pub r#type: Option<TypeProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TypeProto {
        #[prost(message, optional, tag = "1")]
        pub tensor_type: Option<TensorTypeProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorTypeProto {
        #[prost(message, optional, tag = "2")]
        pub shape: Option<TensorShapeProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorShapeProto {
        #[prost(message, repeated, tag = "1")]
        pub dim: Vec<Dimension>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dimension {
        #[prost(int64, tag = "1")]
        pub dim_value: i64,
    }
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

#[derive(Clone, Debug)]
enum Op {
    Conv(Conv),
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

fn attr<'a>(node: &'a proto::NodeProto, name: &str) -> Option<&'a proto::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn ints2(
    node: &proto::NodeProto,
    name: &str,
    default: [usize; 2],
    unsupported: &dyn Fn(String) -> CnnError,
) -> Result<[usize; 2], CnnError> {
    match attr(node, name) {
        None => Ok(default),
        Some(a) if a.ints.len() == 2 && a.ints.iter().all(|&v| (0..=MAX_ATTR).contains(&v)) => {
            Ok([a.ints[0] as usize, a.ints[1] as usize])
        }
        Some(a) => Err(unsupported(format!(
            "node `{}` ({}) has {name} = {:?}; only two values in 0..=64 are supported",
            node.name, node.op_type, a.ints
        ))),
    }
}

/// Values of an f32 initializer, checked for size and finiteness.
fn tensor_values(t: &proto::TensorProto, file: &str) -> Result<(Vec<usize>, Vec<f32>), CnnError> {
    let bad = |reason: String| CnnError::Tensor {
        file: file.to_string(),
        name: t.name.clone(),
        reason,
    };
    if t.data_location != 0 {
        return Err(bad(
            "its data is stored in an external file, which is not supported".into(),
        ));
    }
    if t.dims.iter().any(|&d| !(0..=1 << 24).contains(&d)) {
        return Err(bad(format!("dimensions {:?} are out of range", t.dims)));
    }
    let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= 1 << 28)
        .ok_or_else(|| bad(format!("dimensions {:?} are too large", t.dims)))?;
    // 1 = FLOAT; 7 = INT64 (batch-norm counters, which are never read as data).
    let values: Vec<f32> = match t.data_type {
        1 if !t.raw_data.is_empty() => {
            if t.raw_data.len() != count * 4 {
                return Err(bad(format!(
                    "{} bytes of data for {count} float values",
                    t.raw_data.len()
                )));
            }
            t.raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        }
        1 => {
            if t.float_data.len() != count {
                return Err(bad(format!(
                    "{} float values for dimensions {:?}",
                    t.float_data.len(),
                    dims
                )));
            }
            t.float_data.clone()
        }
        other => return Err(bad(format!("element type {other} is not float32"))),
    };
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!("value {i} is {}", values[i])));
    }
    Ok((dims, values))
}

impl Network {
    /// Reads an ONNX file.
    pub fn from_file(path: &Path) -> Result<Self, CnnError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| CnnError::Format {
            file: name.clone(),
            reason: format!("could not read it: {e}"),
        })?;
        Self::from_bytes(&bytes, &name)
    }

    /// Reads an ONNX model from memory; `file` names it in errors.
    pub fn from_bytes(bytes: &[u8], file: &str) -> Result<Self, CnnError> {
        use prost::Message;
        let format = |reason: String| CnnError::Format {
            file: file.to_string(),
            reason,
        };
        let unsupported = |reason: String| CnnError::Unsupported {
            file: file.to_string(),
            reason,
        };
        let model = proto::ModelProto::decode(bytes).map_err(|e| format(e.to_string()))?;
        let graph = model
            .graph
            .ok_or_else(|| format("the file holds no graph".into()))?;
        if graph.node.is_empty() {
            return Err(format("the graph has no nodes".into()));
        }

        let mut weights: HashMap<&str, &proto::TensorProto> = HashMap::new();
        for t in &graph.initializer {
            weights.insert(t.name.as_str(), t);
        }
        let values = |name: &str| -> Result<(Vec<usize>, Vec<f32>), CnnError> {
            let t = weights.get(name).ok_or_else(|| {
                unsupported(format!(
                    "`{name}` should be a stored weight but is computed"
                ))
            })?;
            tensor_values(t, file)
        };

        // The one image input: a graph input that is not a stored weight.
        let inputs: Vec<&str> = graph
            .input
            .iter()
            .map(|i| i.name.as_str())
            .filter(|n| !weights.contains_key(n))
            .collect();
        let [input_name] = inputs[..] else {
            return Err(unsupported(format!(
                "expected one image input, found {:?}",
                inputs
            )));
        };
        if graph.output.is_empty() {
            return Err(format("the graph has no outputs".into()));
        }

        let mut slot: HashMap<String, usize> = HashMap::new();
        slot.insert(input_name.to_string(), 0);
        // Channels of each buffer; the image's come from its declared shape
        // `[N, C, H, W]`, or from the first convolution that reads it.
        let declared = graph
            .input
            .iter()
            .find(|i| i.name == input_name)
            .and_then(|i| i.r#type.as_ref()?.tensor_type.as_ref()?.shape.as_ref())
            .and_then(|s| s.dim.get(1))
            .map_or(0, |d| usize::try_from(d.dim_value).unwrap_or(0));
        let mut channels: Vec<usize> = vec![declared];
        let mut steps: Vec<Step> = Vec::new();
        for node in &graph.node {
            if !(node.domain.is_empty() || node.domain == "ai.onnx") {
                return Err(unsupported(format!(
                    "node `{}` is from operator domain `{}`",
                    node.name, node.domain
                )));
            }
            let [output] = &node.output[..] else {
                return Err(unsupported(format!(
                    "node `{}` ({}) has {} outputs; one is supported",
                    node.name,
                    node.op_type,
                    node.output.len()
                )));
            };
            let data_input = |k: usize| -> Result<usize, CnnError> {
                let name = node.input.get(k).ok_or_else(|| {
                    unsupported(format!(
                        "node `{}` ({}) lacks input {k}",
                        node.name, node.op_type
                    ))
                })?;
                slot.get(name).copied().ok_or_else(|| {
                    unsupported(format!(
                        "node `{}` ({}) reads `{name}`, which no earlier node writes \
                         (the graph must be in topological order)",
                        node.name, node.op_type
                    ))
                })
            };
            let (op, inputs, out_ch) = match node.op_type.as_str() {
                "Conv" | "ConvTranspose" => {
                    let x = data_input(0)?;
                    let transposed = node.op_type == "ConvTranspose";
                    let (wdims, weight) = values(&node.input[1])?;
                    let groups = attr(node, "group").map_or(1, |a| a.i);
                    if !(1..=1 << 16).contains(&groups) || wdims.len() != 4 {
                        return Err(unsupported(format!(
                            "node `{}`: 2-D convolutions only (weight {:?}, group {groups})",
                            node.name, wdims
                        )));
                    }
                    let groups = groups as usize;
                    let (in_ch, out_ch) = if transposed {
                        (wdims[0], wdims[1] * groups)
                    } else {
                        (wdims[1] * groups, wdims[0])
                    };
                    if x == 0 && channels[0] == 0 {
                        // The image's channels, when the file does not state them.
                        channels[0] = in_ch;
                    }
                    if in_ch != channels[x] || out_ch % groups != 0 || in_ch % groups != 0 {
                        return Err(unsupported(format!(
                            "node `{}`: weight {:?} with group {groups} does not fit its \
                             {}-channel input",
                            node.name, wdims, channels[x]
                        )));
                    }
                    let bias = match node.input.get(2).filter(|n| !n.is_empty()) {
                        Some(b) => {
                            let (bdims, bias) = values(b)?;
                            if bdims != [out_ch] {
                                return Err(unsupported(format!(
                                    "node `{}`: bias {:?} for {out_ch} output channels",
                                    node.name, bdims
                                )));
                            }
                            bias
                        }
                        None => vec![0.0; out_ch],
                    };
                    if let Some(p) =
                        attr(node, "auto_pad").filter(|a| !a.s.is_empty() && a.s != b"NOTSET")
                    {
                        return Err(unsupported(format!(
                            "node `{}`: auto_pad {} (give explicit pads)",
                            node.name,
                            String::from_utf8_lossy(&p.s)
                        )));
                    }
                    if attr(node, "output_shape").is_some() {
                        return Err(unsupported(format!(
                            "node `{}`: output_shape (give pads instead)",
                            node.name
                        )));
                    }
                    let kernel = [wdims[2], wdims[3]];
                    let pads = match attr(node, "pads") {
                        None => [0; 4],
                        Some(a)
                            if a.ints.len() == 4
                                && a.ints.iter().all(|&v| (0..=MAX_ATTR).contains(&v)) =>
                        {
                            // ONNX order: top, left, bottom, right.
                            [
                                a.ints[0] as usize,
                                a.ints[1] as usize,
                                a.ints[2] as usize,
                                a.ints[3] as usize,
                            ]
                        }
                        Some(a) => {
                            return Err(unsupported(format!(
                                "node `{}`: pads {:?}",
                                node.name, a.ints
                            )))
                        }
                    };
                    let stride = ints2(node, "strides", [1, 1], &unsupported)?;
                    let dilation = ints2(node, "dilations", [1, 1], &unsupported)?;
                    let output_padding = ints2(node, "output_padding", [0, 0], &unsupported)?;
                    if stride.contains(&0) || dilation.contains(&0) || kernel.contains(&0) {
                        return Err(unsupported(format!(
                            "node `{}`: zero kernel, stride or dilation",
                            node.name
                        )));
                    }
                    let conv = Conv {
                        weight,
                        bias,
                        in_ch,
                        out_ch,
                        kernel,
                        stride,
                        pads,
                        dilation,
                        groups,
                        output_padding,
                        transposed,
                        relu: false,
                    };
                    (Op::Conv(conv), vec![x], out_ch)
                }
                "BatchNormalization" => {
                    let x = data_input(0)?;
                    let c = channels[x];
                    let eps = attr(node, "epsilon").map_or(1e-5, |a| a.f);
                    let mut v = Vec::with_capacity(4);
                    for k in 1..5 {
                        let name = node.input.get(k).ok_or_else(|| {
                            unsupported(format!("batch norm `{}` lacks input {k}", node.name))
                        })?;
                        let (dims, vals) = values(name)?;
                        if dims != [c] {
                            return Err(unsupported(format!(
                                "batch norm `{}`: `{name}` is {:?} for {c} channels",
                                node.name, dims
                            )));
                        }
                        v.push(vals);
                    }
                    let (gamma, beta, mean, var) = (&v[0], &v[1], &v[2], &v[3]);
                    let scale: Vec<f32> =
                        (0..c).map(|i| gamma[i] / (var[i] + eps).sqrt()).collect();
                    let shift: Vec<f32> = (0..c).map(|i| beta[i] - mean[i] * scale[i]).collect();
                    if scale.iter().chain(&shift).any(|v| !v.is_finite()) {
                        return Err(unsupported(format!(
                            "batch norm `{}` has a negative or zero variance",
                            node.name
                        )));
                    }
                    (
                        Op::Affine {
                            scale,
                            shift,
                            relu: false,
                        },
                        vec![x],
                        c,
                    )
                }
                "Add" => {
                    let (a, b) = (data_input(0)?, data_input(1)?);
                    if channels[a] != channels[b] {
                        return Err(unsupported(format!(
                            "add `{}` of {} and {} channels",
                            node.name, channels[a], channels[b]
                        )));
                    }
                    (Op::Add { relu: false }, vec![a, b], channels[a])
                }
                "Relu" => {
                    let x = data_input(0)?;
                    (Op::Relu, vec![x], channels[x])
                }
                "Sigmoid" => {
                    let x = data_input(0)?;
                    (Op::Sigmoid, vec![x], channels[x])
                }
                other => {
                    return Err(unsupported(format!(
                        "operator {other} (node `{}`); supported: Conv, ConvTranspose, \
                         BatchNormalization, Relu, Add, Sigmoid",
                        node.name
                    )))
                }
            };
            let index = channels.len();
            channels.push(out_ch);
            slot.insert(output.clone(), index);
            steps.push(Step {
                op,
                inputs,
                output: index,
                frees: Vec::new(),
            });
        }
        let outputs = graph
            .output
            .iter()
            .map(|o| {
                slot.get(&o.name)
                    .copied()
                    .filter(|&s| s != 0)
                    .ok_or_else(|| unsupported(format!("output `{}` is not computed", o.name)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut net = Network {
            steps,
            input: 0,
            input_channels: 0,
            outputs,
            buffers: channels.len(),
        };
        net.fuse();
        net.plan_frees();
        net.input_channels = net
            .steps
            .iter()
            .find_map(|s| match &s.op {
                Op::Conv(c) if s.inputs[0] == 0 => Some(c.in_ch),
                _ => None,
            })
            .ok_or_else(|| unsupported("no convolution reads the image input".into()))?;
        Ok(net)
    }

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
#[derive(Debug, Default)]
pub struct Workspace {
    free: Vec<Vec<f32>>,
}

impl Workspace {
    /// Most buffers kept: a MobileNet's widest point holds a handful alive.
    const KEEP: usize = 16;

    /// A zeroed buffer of `len` values.
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
        v.clear();
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
    }
}

/// Inner dimension up to which a 1x1 convolution runs on [`pointwise_block`]
/// rather than `gemm`: with 16 to 64 input channels the product is a few
/// multiply-adds per output, and gemm's packing costs more than the
/// arithmetic (measured on CenterFace's 16 -> 96 layer at 240x320: 25 ms in
/// gemm on the 2-core AMD EPYC).
const SMALL_K: usize = 64;

/// Output columns per block of [`pointwise_block`]: its rows of `acc` stay in L1.
const POINTWISE_BLOCK: usize = 256;

multiversion! {
    /// `acc [m, len] = bias + w [m, k] x xs [k, n][.., c0..c0 + len]`, then
    /// the ReLU; `m` is `bias.len()`.
    #[allow(clippy::too_many_arguments)]
    pub fn pointwise_block(
        acc: &mut [f32],
        w: &[f32],
        xs: &[f32],
        n: usize,
        c0: usize,
        len: usize,
        bias: &[f32],
        relu: bool
    ) {
        let m = bias.len();
        let k = w.len() / m.max(1);
        for (co, row) in acc.chunks_exact_mut(len).enumerate().take(m) {
            row.fill(bias[co]);
            for (kk, &wv) in w[co * k..(co + 1) * k].iter().enumerate() {
                let x = &xs[kk * n + c0..kk * n + c0 + len];
                for (a, &v) in row.iter_mut().zip(x) {
                    *a += wv * v;
                }
            }
            if relu {
                row.iter_mut().for_each(|v| *v = v.max(0.0));
            }
        }
    }
}

/// A 1x1 convolution with few input channels: blocks of output columns in
/// parallel, each computed in cache and copied out once.
fn pointwise_small(dst: &mut [f32], w: &[f32], xs: &[f32], n: usize, bias: &[f32], relu: bool) {
    let m = bias.len();
    let dst_ptr = SendPtr(dst.as_mut_ptr());
    assert!(dst.len() >= m * n);
    let blocks: Vec<usize> = (0..n).step_by(POINTWISE_BLOCK).collect();
    blocks.par_iter().for_each_init(
        || vec![0.0f32; m * POINTWISE_BLOCK],
        |acc, &c0| {
            let len = POINTWISE_BLOCK.min(n - c0);
            pointwise_block(&mut acc[..m * len], w, xs, n, c0, len, bias, relu);
            for (co, row) in acc[..m * len].chunks_exact(len).enumerate() {
                // SAFETY: `dst` holds `m * n` values (asserted above); this
                // task alone writes columns `c0..c0 + len` of each row.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        row.as_ptr(),
                        dst_ptr.get().add(co * n + c0),
                        len,
                    );
                }
            }
        },
    );
}

/// Columns of the output computed per task: a block of every output row
/// stays in the core's cache from the bias fill through the product to the
/// ReLU, instead of streaming a whole feature map three times.
const COLUMN_BLOCK: usize = 1024;

/// A raw pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used for tasks that write disjoint column ranges of one
// buffer that outlives them (see `conv_matmul`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `dst [m, n] = act(bias + lhs [m, k] x rhs [k, n])` (without a bias, `dst`
/// is overwritten), row-major `dst` and
/// `rhs`, `lhs` with the given row and column strides; one task per block of
/// columns on rayon's current pool.
#[allow(clippy::too_many_arguments)]
fn conv_matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
) {
    assert!(dst.len() >= m * n && rhs.len() >= k * n);
    assert!(m == 0 || k == 0 || (m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len());
    let dst_ptr = SendPtr(dst.as_mut_ptr());
    let blocks: Vec<(usize, usize)> = (0..n)
        .step_by(COLUMN_BLOCK)
        .map(|c0| (c0, (c0 + COLUMN_BLOCK).min(n)))
        .collect();
    let run = |&(c0, c1): &(usize, usize)| {
        let cols = c1 - c0;
        let base = dst_ptr.get();
        // SAFETY: the assertions above bound every access: `dst` and `rhs`
        // hold `m * n` and `k * n` values with row stride `n`, `lhs` covers
        // `m` rows and `k` columns at its strides. Each task touches only
        // columns `c0..c1` of `dst`, so tasks never overlap.
        unsafe {
            if let Some(b) = bias {
                for (r, &v) in b.iter().enumerate().take(m) {
                    std::slice::from_raw_parts_mut(base.add(r * n + c0), cols).fill(v);
                }
            }
            gemm::gemm(
                m,
                cols,
                k,
                base.add(c0),
                1,
                n as isize,
                // Without a bias the product overwrites `dst`.
                bias.is_some(),
                lhs.as_ptr(),
                lhs_cs as isize,
                lhs_rs as isize,
                rhs.as_ptr().add(c0),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
            if relu {
                for r in 0..m {
                    let row = std::slice::from_raw_parts_mut(base.add(r * n + c0), cols);
                    row.iter_mut().for_each(|v| *v = v.max(0.0));
                }
            }
        }
    };
    if blocks.len() > 1 && rayon::current_num_threads() > 1 {
        blocks.par_iter().for_each(run);
    } else {
        blocks.iter().for_each(run);
    }
}

impl Conv {
    fn fold_affine(&mut self, scale: &[f32], shift: &[f32]) {
        let (kh, kw) = (self.kernel[0], self.kernel[1]);
        if self.transposed {
            // [in, out / g, kh, kw]: output channel = g * (out / g) + o.
            let per = self.out_ch / self.groups;
            let in_per = self.in_ch / self.groups;
            for ci in 0..self.in_ch {
                let g = ci / in_per;
                for o in 0..per {
                    let co = g * per + o;
                    let at = (ci * per + o) * kh * kw;
                    self.weight[at..at + kh * kw]
                        .iter_mut()
                        .for_each(|w| *w *= scale[co]);
                }
            }
        } else {
            let per = self.weight.len() / self.out_ch;
            for co in 0..self.out_ch {
                self.weight[co * per..(co + 1) * per]
                    .iter_mut()
                    .for_each(|w| *w *= scale[co]);
            }
        }
        for co in 0..self.out_ch {
            self.bias[co] = self.bias[co] * scale[co] + shift[co];
        }
    }

    fn out_size(&self, h: usize, w: usize) -> Result<(usize, usize), CnnError> {
        let dim = |i: usize, size: usize| -> Option<usize> {
            let span = self.dilation[i] * (self.kernel[i] - 1) + 1;
            let (p0, p1) = (self.pads[i], self.pads[i + 2]);
            if self.transposed {
                ((size - 1) * self.stride[i] + span + self.output_padding[i]).checked_sub(p0 + p1)
            } else {
                (size + p0 + p1)
                    .checked_sub(span)
                    .map(|v| v / self.stride[i] + 1)
            }
        };
        match (dim(0, h), dim(1, w)) {
            (Some(oh), Some(ow))
                if oh > 0
                    && ow > 0
                    && oh
                        .checked_mul(ow)
                        .and_then(|n| n.checked_mul(self.out_ch))
                        .is_some_and(|n| n <= MAX_MAP) =>
            {
                Ok((oh, ow))
            }
            _ => Err(CnnError::Input {
                got: [self.in_ch, h, w],
                expected:
                    "an image larger than the network's kernels, and feature maps under 1 GiB",
            }),
        }
    }

    fn run(&self, x: &FeatureMap, ws: &mut Workspace) -> Result<FeatureMap, CnnError> {
        let (oh, ow) = self.out_size(x.h, x.w)?;
        let mut y = ws.map(self.out_ch, oh, ow);
        // Each kernel adds the bias and applies the ReLU while a block of its
        // output is in cache.
        if self.transposed {
            self.transposed_into(x, &mut y, ws);
        } else if self.groups == self.in_ch && self.groups == self.out_ch && self.groups > 1 {
            self.depthwise_into(x, &mut y);
        } else {
            self.dense_into(x, &mut y, ws);
        }
        Ok(y)
    }

    /// Grouped or full convolution: im2col per group, then a matrix product
    /// (a 1x1, stride-1 convolution reads the input directly).
    fn dense_into(&self, x: &FeatureMap, y: &mut FeatureMap, ws: &mut Workspace) {
        let (kh, kw) = (self.kernel[0], self.kernel[1]);
        let (oh, ow) = (y.h, y.w);
        let n = oh * ow;
        let cin_g = self.in_ch / self.groups;
        let cout_g = self.out_ch / self.groups;
        let k = cin_g * kh * kw;
        let direct = kh == 1 && kw == 1 && self.stride == [1, 1] && self.pads == [0; 4];
        let mut cols = if direct { Vec::new() } else { ws.take(k * n) };
        for g in 0..self.groups {
            let xg = &x.data[g * cin_g * x.h * x.w..(g + 1) * cin_g * x.h * x.w];
            let rhs: &[f32] = if direct {
                xg
            } else {
                cols.par_chunks_mut(n).enumerate().for_each(|(row, out)| {
                    let ci = row / (kh * kw);
                    let (ky, kx) = ((row / kw) % kh, row % kw);
                    let plane = &xg[ci * x.h * x.w..(ci + 1) * x.h * x.w];
                    for oy in 0..oh {
                        let iy = (oy * self.stride[0] + ky * self.dilation[0]) as isize
                            - self.pads[0] as isize;
                        let dst = &mut out[oy * ow..(oy + 1) * ow];
                        if iy < 0 || iy >= x.h as isize {
                            dst.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * x.w..(iy as usize + 1) * x.w];
                        // Output columns whose input column is inside the row.
                        let sx = self.stride[1];
                        let off = (kx * self.dilation[1]) as isize - self.pads[1] as isize;
                        let lo = if off < 0 {
                            ((-off) as usize).div_ceil(sx)
                        } else {
                            0
                        };
                        let hi = if (x.w as isize) > off {
                            ((x.w as isize - off - 1) as usize / sx + 1).min(ow)
                        } else {
                            0
                        };
                        if lo >= hi {
                            dst.fill(0.0);
                            continue;
                        }
                        dst[..lo].fill(0.0);
                        dst[hi..].fill(0.0);
                        let start = (lo * sx) as isize + off;
                        let start = start as usize;
                        if sx == 1 {
                            dst[lo..hi].copy_from_slice(&src[start..start + hi - lo]);
                        } else {
                            for (j, d) in dst[lo..hi].iter_mut().enumerate() {
                                *d = src[start + j * sx];
                            }
                        }
                    }
                });
                &cols
            };
            let w = &self.weight[g * cout_g * k..(g + 1) * cout_g * k];
            let dst = &mut y.data[g * cout_g * n..(g + 1) * cout_g * n];
            let bias = &self.bias[g * cout_g..(g + 1) * cout_g];
            if k <= SMALL_K {
                pointwise_small(dst, w, rhs, n, bias, self.relu);
            } else {
                conv_matmul(cout_g, n, k, dst, w, k, 1, rhs, Some(bias), self.relu);
            }
        }
        ws.give(cols);
    }

    /// One filter per channel: a direct stencil, one channel per task.
    fn depthwise_into(&self, x: &FeatureMap, y: &mut FeatureMap) {
        let fast = self.kernel == [3, 3]
            && self.dilation == [1, 1]
            && self.pads == [1; 4]
            && (self.stride == [1, 1] || self.stride == [2, 2]);
        let (oh, ow) = (y.h, y.w);
        y.data
            .par_chunks_mut(oh * ow)
            .enumerate()
            .for_each(|(ch, out)| {
                let k = self.kernel[0] * self.kernel[1];
                let w = &self.weight[ch * k..(ch + 1) * k];
                out.fill(self.bias[ch]);
                if fast {
                    depthwise3x3(x.plane(ch), x.w, x.h, w, self.stride[0], out, ow, oh);
                } else {
                    self.depthwise_plane(x.plane(ch), x.w, x.h, w, out, ow, oh);
                }
                if self.relu {
                    out.iter_mut().for_each(|v| *v = v.max(0.0));
                }
            });
    }

    /// Any kernel, stride, padding and dilation, one plane.
    #[allow(clippy::too_many_arguments)]
    fn depthwise_plane(
        &self,
        plane: &[f32],
        iw: usize,
        ih: usize,
        w: &[f32],
        out: &mut [f32],
        ow: usize,
        oh: usize,
    ) {
        let (kh, kw) = (self.kernel[0], self.kernel[1]);
        let [sy, sx] = self.stride;
        let [dy, dx] = self.dilation;
        let (pt, pl) = (self.pads[0] as isize, self.pads[1] as isize);
        for oy in 0..oh {
            for ky in 0..kh {
                let iy = (oy * sy + ky * dy) as isize - pt;
                if iy < 0 || iy >= ih as isize {
                    continue;
                }
                let src = &plane[iy as usize * iw..(iy as usize + 1) * iw];
                for kx in 0..kw {
                    let wv = w[ky * kw + kx];
                    for (ox, d) in out[oy * ow..(oy + 1) * ow].iter_mut().enumerate() {
                        let ix = (ox * sx + kx * dx) as isize - pl;
                        if ix >= 0 && ix < iw as isize {
                            *d += wv * src[ix as usize];
                        }
                    }
                }
            }
        }
    }
    /// Transposed convolution: the matrix product `W^T x` gives each input
    /// pixel's contribution to every kernel tap, which is then added into place.
    fn transposed_into(&self, x: &FeatureMap, y: &mut FeatureMap, ws: &mut Workspace) {
        let (kh, kw) = (self.kernel[0], self.kernel[1]);
        let n = x.h * x.w;
        let cin_g = self.in_ch / self.groups;
        let cout_g = self.out_ch / self.groups;
        let rows = cout_g * kh * kw;
        let mut cols = ws.take(rows * n);
        for g in 0..self.groups {
            // Weight [in, out/g, kh, kw] of this group, read as [cin_g, rows]
            // and used transposed: lhs [rows, cin_g].
            let w = &self.weight[g * cin_g * rows..(g + 1) * cin_g * rows];
            let xg = &x.data[g * cin_g * n..(g + 1) * cin_g * n];
            conv_matmul(rows, n, cin_g, &mut cols, w, 1, rows, xg, None, false);
            let (oh, ow) = (y.h, y.w);
            let out = &mut y.data[g * cout_g * oh * ow..(g + 1) * cout_g * oh * ow];
            out.par_chunks_mut(oh * ow)
                .enumerate()
                .for_each(|(co, plane)| {
                    plane.fill(self.bias[g * cout_g + co]);
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let row = &cols[((co * kh + ky) * kw + kx) * n..][..n];
                            for iy in 0..x.h {
                                let oy = (iy * self.stride[0] + ky * self.dilation[0]) as isize
                                    - self.pads[0] as isize;
                                if oy < 0 || oy >= oh as isize {
                                    continue;
                                }
                                for ix in 0..x.w {
                                    let ox = (ix * self.stride[1] + kx * self.dilation[1]) as isize
                                        - self.pads[1] as isize;
                                    if ox >= 0 && ox < ow as isize {
                                        plane[oy as usize * ow + ox as usize] += row[iy * x.w + ix];
                                    }
                                }
                            }
                        }
                    }
                    if self.relu {
                        plane.iter_mut().for_each(|v| *v = v.max(0.0));
                    }
                });
        }
        ws.give(cols);
    }
}

multiversion! {
    /// A 3x3 depthwise filter with padding 1 and stride 1 or 2 over one plane,
    /// written so that every tap is a contiguous multiply-add the compiler
    /// vectorises (stride 2 first splits each input row into even and odd columns).
    #[allow(clippy::too_many_arguments)]
    pub fn depthwise3x3(
        plane: &[f32],
        iw: usize,
        ih: usize,
        w: &[f32],
        stride: usize,
        out: &mut [f32],
        ow: usize,
        oh: usize
    ) {
        let mut even = vec![0.0f32; iw.div_ceil(2) + 1];
        let mut odd = vec![0.0f32; iw / 2 + 1];
        for oy in 0..oh {
            let dst = &mut out[oy * ow..(oy + 1) * ow];
            for ky in 0..3 {
                let iy = (oy * stride + ky) as isize - 1;
                if iy < 0 || iy >= ih as isize {
                    continue;
                }
                let row = &plane[iy as usize * iw..(iy as usize + 1) * iw];
                let (w0, w1, w2) = (w[ky * 3], w[ky * 3 + 1], w[ky * 3 + 2]);
                if stride == 1 {
                    // out[x] += w0 * row[x - 1] + w1 * row[x] + w2 * row[x + 1],
                    // with zeros outside the row (here ow == iw).
                    if iw == 1 {
                        dst[0] += w1 * row[0];
                        continue;
                    }
                    let inner = dst[1..iw - 1].iter_mut().zip(&row[..iw - 2]);
                    for ((d, &l), (&c, &r)) in inner.zip(row[1..iw - 1].iter().zip(&row[2..])) {
                        *d += w0 * l + w1 * c + w2 * r;
                    }
                    dst[0] += w1 * row[0] + w2 * row[1];
                    dst[iw - 1] += w0 * row[iw - 2] + w1 * row[iw - 1];
                } else {
                    // Input column 2x - 1 + kx: odd[x - 1], even[x], odd[x].
                    for ((pair, e), o) in row.chunks_exact(2).zip(&mut even).zip(&mut odd) {
                        *e = pair[0];
                        *o = pair[1];
                    }
                    if iw % 2 == 1 {
                        even[iw / 2] = row[iw - 1];
                    }
                    let ne = iw.div_ceil(2);
                    let no = iw / 2;
                    for (d, &e) in dst.iter_mut().zip(&even[..ne]) {
                        *d += w1 * e;
                    }
                    for (d, &o) in dst.iter_mut().zip(&odd[..no]) {
                        *d += w2 * o;
                    }
                    if ow > 1 {
                        for (d, &o) in dst[1..].iter_mut().zip(&odd[..no]) {
                            *d += w0 * o;
                        }
                    }
                }
            }
        }
    }
}
