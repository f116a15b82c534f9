import Foundation
import Testing
@testable import KVRecallKernels

/// Graph links grow one key at a time during decoding: a buffer past 64 KB grows within the
/// address space it reserved (no copy on a decode step), a reservation made off the decode path
/// holds until it is used up, and contents survive every move.
@Suite struct Int32BufferTests {
    @Test func largeBuffersGrowInPlaceAndKeepTheirContents() {
        let buffer = Int32Buffer()
        var expected: [Int32] = []
        var moves = 0, last = buffer.pointer
        for i in 0..<(600_000 as Int32) {  // 2.4 MB, one element at a time
            buffer.append(i &* 7)
            expected.append(i &* 7)
            if buffer.pointer != last { moves += 1; last = buffer.pointer }
        }
        #expect(buffer.array == expected)
        // Doublings from 16 elements: nine malloc'd moves (to 8192), the tenth into a mapping
        // (16384 elements: 64 KB) whose reservation (64 MB) holds every later doubling.
        #expect(moves == 10, "moved \(moves) times")
        let pointer = buffer.pointer
        buffer.grow(by: 3_000_000)  // to 14.4 MB: still within the reservation
        #expect(buffer.pointer == pointer && buffer.count == 3_600_000)
        #expect(Array(buffer.array.prefix(600_000)) == expected && buffer.array.suffix(3_000_000).allSatisfy { $0 == 0 })
    }

    @Test func aReservationHoldsOneElementAppends() {
        let buffer = Int32Buffer(capacity: 1000)
        buffer.append(contentsOf: (0..<1000).map { Int32($0) })
        buffer.reserveAndTouch(500_000)
        let pointer = buffer.pointer
        for i in 1000..<500_000 { buffer.append(Int32(i)) }
        #expect(buffer.pointer == pointer, "no move within the reservation")
        #expect(buffer.array == (0..<500_000).map { Int32($0) })
    }
}
