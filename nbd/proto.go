package nbd

// Wire constants of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md).
// All numbers travel in network byte order.

// Magic numbers.
const (
	magicNBD            = 0x4e42444d41474943 // "NBDMAGIC", first word of the greeting
	magicOpt            = 0x49484156454f5054 // "IHAVEOPT", greeting and every option header
	magicOptReply       = 0x0003e889045565a9 // option replies
	magicRequest        = 0x25609513         // transmission requests
	magicSimpleReply    = 0x67446698         // simple replies
	magicStructuredRepl = 0x668e33ef         // structured reply chunks
)

// Handshake flags (server, 16 bits) and client flags (32 bits).
const (
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	flagCFixedNewstyle = 1 << 0
	flagCNoZeroes      = 1 << 1
)

// Transmission flags (16 bits, per export).
const (
	flagHasFlags        = 1 << 0
	flagReadOnly        = 1 << 1
	flagSendFlush       = 1 << 2
	flagSendFUA         = 1 << 3
	flagRotational      = 1 << 4
	flagSendTrim        = 1 << 5
	flagSendWriteZeroes = 1 << 6
	flagSendDF          = 1 << 7
	flagCanMultiConn    = 1 << 8
	flagSendResize      = 1 << 9
	flagSendCache       = 1 << 10
	flagSendFastZero    = 1 << 11
)

// Options.
const (
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optPeekExport      = 4
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10
	optExtendedHeaders = 11
)

// Option reply types; errors have bit 31 set.
const (
	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4

	repErrUnsup         = 1<<31 | 1
	repErrPolicy        = 1<<31 | 2
	repErrInvalid       = 1<<31 | 3
	repErrPlatform      = 1<<31 | 4
	repErrTLSReqd       = 1<<31 | 5
	repErrUnknown       = 1<<31 | 6
	repErrShutdown      = 1<<31 | 7
	repErrBlockSizeReqd = 1<<31 | 8
	repErrTooBig        = 1<<31 | 9
)

// NBD_INFO_* types in NBD_REP_INFO replies to NBD_OPT_INFO and NBD_OPT_GO.
const (
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3
)

// Commands.
const (
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7
)

// Command flags.
const (
	cmdFlagFUA      = 1 << 0
	cmdFlagNoHole   = 1 << 1
	cmdFlagDF       = 1 << 2
	cmdFlagReqOne   = 1 << 3
	cmdFlagFastZero = 1 << 4
)

// Structured reply flags and chunk types.
const (
	replyFlagDone = 1 << 0

	replyTypeNone        = 0
	replyTypeOffsetData  = 1
	replyTypeOffsetHole  = 2
	replyTypeBlockStatus = 5
	replyTypeError       = 1<<15 | 1
	replyTypeErrorOffset = 1<<15 | 2
)

// base:allocation status flags.
const (
	stateHole = 1 << 0
	stateZero = 1 << 1
)

// Error values of replies (the protocol's own numbering, which happens to be
// Linux errno).
const (
	errPerm     = 1
	errIO       = 5
	errNoMem    = 12
	errInval    = 22
	errNoSpc    = 28
	errOverflow = 75
	errNotSup   = 95
	errShutdown = 108
)

// Sizes.
const (
	requestHeaderLen   = 28
	simpleReplyLen     = 16
	chunkHeaderLen     = 20
	optHeaderLen       = 16
	optReplyHeaderLen  = 20
	maxStringLen       = 4096     // export names, queries and messages
	maxOptionLen       = 64 << 10 // option data accepted during negotiation
	maxOptions         = 4096     // options per connection before it is dropped
	defaultMaxRequest  = 32 << 20 // largest READ/WRITE payload
	minBlockSize       = 1        // NBD_INFO_BLOCK_SIZE minimum
	preferredBlockSize = 4096     // NBD_INFO_BLOCK_SIZE preferred
	maxExtentsPerReply = 8192     // descriptors in one NBD_REPLY_TYPE_BLOCK_STATUS
	writePiece         = 1 << 20  // reply data written per write deadline
	maxReadsPerRequest = 8        // device reads at once for the data runs of one READ
	baseAllocation     = "base:allocation"
	baseAllocationID   = 1 // metadata context id handed out by SET_META_CONTEXT
	defaultMaxInFlight = 64
	// defaultMaxTotalBytes bounds the payloads of all connections: nbdcopy's
	// four connections of 64 requests of 256 KiB each would otherwise hold
	// 64 MiB, and N clients N times that. A cold nbdcopy of the ext4
	// benchmark image took 3.5-4.1 s with it against 3.4-3.9 s without
	// (interleaved, same minute): a disk has at most 32 fetches in flight.
	defaultMaxTotalBytes = 32 << 20
	defaultHandshakeTTL  = 30 // seconds
	defaultWriteTTL      = 60 // seconds
)
