//! Wire protocol version exchanged at worker registration. Bump it whenever a change to
//! `proto/cvdist.proto` or to the data-plane framing is not understood by older peers.
/// 3: checkpoint state as a message (`CheckpointChunk.state`) instead of JSON text.
/// 4: `JobSpec.grad_compression` (gradient buckets may travel as bf16/fp16, so ranks of
/// different versions would misread the ring) and the re-registration of a running attempt
/// after a coordinator restart (`WorkerMessage.rejoin`, `Registered.adopted`).
/// 5: `JobSpec.sync_bn` and `JobSpec.global_batch` (an older worker would train with its own
/// batch size and per-rank BatchNorm, a different run than the job asks for).
pub const PROTOCOL_VERSION: u32 = 5;

/// Maximum size of one gRPC message in either direction (chunks are far smaller).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Size of dataset and checkpoint chunks streamed over gRPC.
pub const CHUNK_BYTES: usize = 1024 * 1024;
