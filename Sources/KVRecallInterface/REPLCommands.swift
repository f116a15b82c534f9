import KVRecall
/// The commands of the interactive session (`kvrecall repl`): names, usage and help text, the
/// tokenizer, and the suggestions offered for a mistyped name. The interpreter that runs them is
/// `REPLInterpreter`; the line-editing front end lives in the CLI.
public struct REPLCommand: Sendable, Equatable {
    public let name: String
    public let usage: String
    public let summary: String
    public let detail: String

    /// Every command, in the order `help` lists them.
    public static let all: [REPLCommand] = [
        REPLCommand(name: "open", usage: "open DIR", summary: "open a store (read-only) and use its first head", detail: """
            Opens the store in directory DIR read-only, closing the one open before (if DIR cannot be
            opened, the open store stays). The first head becomes the current head.
            Example: open /tmp/s
            """),
        REPLCommand(name: "heads", usage: "heads", summary: "list the store's heads and their indexes", detail: """
            One row per head: C/L/H (context/layer/head), dimension, dtype, keys, stored prefill queries
            and built indexes. The current head is marked with *.
            """),
        REPLCommand(name: "use", usage: "use C/L/H", summary: "make a head current (L/H means context 0)", detail: """
            Selects the head that queries, attention and comparisons run on. The current query and the
            last search are cleared. Tab completes the heads of the open store.
            Example: use 0/2/6
            """),
        REPLCommand(name: "info", usage: "info", summary: "the store, current head, query, settings and methods", detail: """
            Prints where the session stands: the store, the current head (counts, dimension, dtype,
            indexes), the current query, the settings, and which methods can run on this head.
            """),
        REPLCommand(name: "set", usage: "set k|ef|nprobe|window|sinks|method VALUE", summary: "change a setting", detail: """
            k       positions retrieved beyond the static part (also the k of `query`'s exact top-k)
            ef      HNSW and retrieval graph: candidate list size at search
            nprobe  IVF: lists probed (estimate's retrieval zone is set by k, not by nprobe)
            window  last positions always attended (recent window)
            sinks   first positions always attended (attention sinks)
            method  the method `attend` uses: exact, retrieval, hip, landmark, hnsw, ivf, lsh, tree, estimate
            Examples: set k 50    set method hnsw    set ef 128
            """),
        REPLCommand(name: "settings", usage: "settings", summary: "show the settings", detail: """
            The current values of k, ef, nprobe, window, sinks and method, with what each one does.
            """),
        REPLCommand(name: "query", usage: "query ROW | random | file Q.npy ROW", summary: "select the current query; print its exact top-k", detail: """
            query ROW          row ROW of the current head's stored prefill queries
            query random       a random row of them
            query file F ROW   row ROW of an [M, d] .npy file (d = the head's dimension)
            query              the current query again
            Prints the exact top-k keys by inner product with their softmax attention weights, and
            how much of the attention mass exact top-k and the static part hold.
            Examples: query 17    query random    query file Data/minilm/queries.npy 0
            """),
        REPLCommand(name: "attend", usage: "attend [METHOD]", summary: "attention for the current query, with fidelity", detail: """
            Runs METHOD (default: the `method` setting) on the current query with the current settings:
            the static part (sinks and window) plus k positions the method selects. Prints what was
            attended, recall@k against exact top-k, attention mass, output error against exact
            attention (with the oracle's: exact top-k plus the static part), keys scanned, latency,
            and the top attended positions. Index methods need `kvrecall build --index NAME` first.
            Example: attend hnsw
            """),
        REPLCommand(name: "compare", usage: "compare", summary: "every available method side by side on the current query", detail: """
            Runs every method this head can run (those needing no index, and those whose index is
            built) on the current query and prints recall, attention mass, output error, keys scanned
            and latency in one table, as `kvrecall attend --method all` does for a query file.
            """),
        REPLCommand(name: "explain", usage: "explain", summary: "what the last search touched", detail: """
            For the last `query`, `attend` or `compare`: the method and its search parameter, keys
            scanned, distance computations (query-key inner products), auxiliary computations
            (centroid or hash scores), how many positions were attended (static part and retrieved)
            and how many clusters were estimated rather than attended.
            """),
        REPLCommand(name: "help", usage: "help [COMMAND]", summary: "this list, or one command in detail", detail: """
            Example: help query
            """),
        REPLCommand(name: "quit", usage: "quit", summary: "leave the session (also: exit, Ctrl-D)", detail: """
            Ends the session. Standard input reaching its end does the same.
            """),
    ]

    /// Other names accepted for a command.
    public static let aliases: [String: String] = ["exit": "quit", "?": "help", "q": "quit"]

    public static func named(_ name: String) -> REPLCommand? {
        let canonical = aliases[name] ?? name
        return all.first { $0.name == canonical }
    }

    /// The settings `set` changes, in the order `settings` lists them.
    public static let settingNames = ["k", "ef", "nprobe", "window", "sinks", "method"]

    /// Up to three known names close to `word` (same prefix, or at most two edits away).
    public static func suggestions(for word: String, among names: [String]) -> [String] {
        let w = word.lowercased()
        let scored = names.compactMap { name -> (Int, String)? in
            if w.count >= 2 && name.hasPrefix(w) { return (0, name) }
            let d = editDistance(w, name)
            return d <= min(2, max(1, w.count / 2)) ? (d, name) : nil
        }
        return scored.sorted { $0 < $1 }.prefix(3).map(\.1)
    }

    static func editDistance(_ a: String, _ b: String) -> Int {
        let a = Array(a), b = Array(b)
        if a.isEmpty { return b.count }
        if b.isEmpty { return a.count }
        var previous = Array(0...b.count)
        var current = previous
        for i in 1...a.count {
            current[0] = i
            for j in 1...b.count {
                current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
            }
            swap(&previous, &current)
        }
        return previous[b.count]
    }
}

/// A mistake in a command line, or a failure while running it: printed, and the session goes on.
public struct REPLError: Error, CustomStringConvertible, Equatable {
    public let description: String
    /// Messages quote what the user typed; a huge line (a pasted file) is cut in the middle so the
    /// message stays readable and keeps its end (the usage or the valid choices).
    public init(_ description: String) {
        let limit = 600
        guard description.count > limit else { self.description = description; return }
        let omitted = description.count - 500
        self.description = "\(description.prefix(300))… [\(omitted) characters omitted] …\(description.suffix(200))"
    }
}

extension REPLCommand {
    /// Splits a command line into words at blanks. Single or double quotes group a word with
    /// blanks ('my store'); a backslash outside single quotes takes the next character literally.
    /// A word that starts with an unquoted `#` begins a comment to the end of the line, as in a shell
    /// (so the README's `query 17   # a stored prefill query` runs when pasted); `a#b` is one word.
    public static func tokenize(_ line: String) throws -> [String] {
        var words: [String] = []
        var current = ""
        var inWord = false
        var quote: Character?
        var escaped = false
        for c in line {
            if escaped {
                current.append(c)
                escaped = false
                continue
            }
            if let q = quote {
                if c == q { quote = nil } else if c == "\\" && q == "\"" { escaped = true } else { current.append(c) }
                continue
            }
            switch c {
            case " ", "\t", "\n", "\r":
                if inWord { words.append(current); current = ""; inWord = false }
            case "'", "\"":
                quote = c
                inWord = true
            case "\\":
                escaped = true
                inWord = true
            default:
                if c == "#" && !inWord { return words }
                current.append(c)
                inWord = true
            }
        }
        if quote != nil { throw REPLError("unterminated quote in: \(line)") }
        if escaped { current.append("\\") }
        if inWord { words.append(current) }
        return words
    }
}
