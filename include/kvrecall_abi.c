/* The C side of the ABI target. Every entry point, kvrecall_config_default included, is defined in
 * Swift (Sources/KVRecallC), so the defaults come from the library's SessionConfiguration; this
 * file only gives the header-only target a translation unit. */
#include "kvrecall.h"
