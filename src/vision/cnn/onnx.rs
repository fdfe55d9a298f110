//! Reading a network from an ONNX file: the few messages of `onnx.proto`
//! such a graph needs, decoded with `prost`, and the graph walked into
//! [`Network`]'s steps.

use std::collections::HashMap;
use std::path::Path;

use super::{CnnError, Conv, Network, Op, Step, MAX_ATTR};

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
        net.fuse_inverted();
        net.plan_frees();
        net.input_channels = net
            .steps
            .iter()
            .find_map(|s| match &s.op {
                Op::Conv(c) if s.inputs[0] == 0 => Some(c.in_ch),
                Op::Inverted(f) if s.inputs[0] == 0 => Some(f.expand.in_ch),
                _ => None,
            })
            .ok_or_else(|| unsupported("no convolution reads the image input".into()))?;
        Ok(net)
    }
}
