import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage

extension IndexCatalog {
    /// Section of a stored index holding its `SearchCalibration` (JSON), next to the index's own sections.
    static let calibrationSection = "calibration"

    /// Index `kind` of head `id` with the calibration stored beside it (nil when it was built
    /// without one); views of the map, or with `copy` a copy (see `load(_:snapshot:head:copy:)`).
    public static func loadCalibrated(_ kind: IndexKind, snapshot: StoreSnapshot, head id: HeadID,
                                      copy: Bool = false) throws -> (index: any BuildableIndex, calibration: SearchCalibration?) {
        guard let type = kind.type else { throw IndexError.invalidParameter("'\(kind.rawValue)' is not a stored index kind") }
        let sections = try snapshot.index(id, name: kind.rawValue, copy: copy)
        let index = try load(type, from: sections, head: id, name: kind.rawValue)
        return (index, try sections?[calibrationSection].map { try SearchCalibration(encoded: $0.array, kind: kind) })
    }
}

extension SearchCalibration {
    func encoded() throws -> [UInt8] { Array(try JSONEncoder().encode(self)) }

    init(encoded bytes: [UInt8], kind: IndexKind) throws {
        do {
            self = try JSONDecoder().decode(SearchCalibration.self, from: Data(bytes))
        } catch {
            throw IndexError.corrupt("\(kind.rawValue) calibration section is unreadable (\(error)); rebuild the index")
        }
        guard value >= 1, SearchKnob(kind: kind) == knob else {
            throw IndexError.corrupt("\(kind.rawValue) calibration names \(knob.rawValue) \(value); rebuild the index")
        }
    }
}
