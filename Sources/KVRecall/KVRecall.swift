// The engine as one module: `import KVRecall` gives every layer's public API. The layers are
// separate targets so the compiler keeps each one from naming the layers above it:
// Support <- Kernels <- Formats <- Storage <- Indexes <- Attention <- Planning <- Session.
// Presentation (tables, terminal, the REPL's interpreter) lives in KVRecallInterface, outside
// the library the C ABI ships.
@_exported import KVRecallSupport
@_exported import KVRecallKernels
@_exported import KVRecallFormats
@_exported import KVRecallStorage
@_exported import KVRecallIndexes
@_exported import KVRecallAttention
@_exported import KVRecallPlanning
@_exported import KVRecallSession
