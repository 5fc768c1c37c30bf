#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A read-only memory map of a whole file. Weights are used in place from the map, so a
/// checkpoint costs page cache, not heap, and loads as fast as the disk allows.
public final class MappedFile: @unchecked Sendable {
    public let path: String
    public let base: UnsafeRawPointer
    public let size: Int

    public init(path: String) throws {
        self.path = path
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else {
            throw FulgurError(.io, "\(path): cannot open (\(String(cString: strerror(errno))))")
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            throw FulgurError(.io, "\(path): cannot stat (\(String(cString: strerror(errno))))")
        }
        if (st.st_mode & S_IFMT) == S_IFDIR {
            throw FulgurError(.io, "\(path): is a directory, expected a file")
        }
        size = Int(st.st_size)
        guard size > 0 else { throw FulgurError(.format, "\(path): file is empty") }
        let p = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0)
        guard let p, p != MAP_FAILED else {
            throw FulgurError(.io, "\(path): cannot map (\(String(cString: strerror(errno))))")
        }
        base = UnsafeRawPointer(p)
    }

    deinit { munmap(UnsafeMutableRawPointer(mutating: base), size) }
}

/// Bounds-checked little-endian reads from a byte range, for parsing headers of untrusted files.
struct ByteReader {
    let base: UnsafeRawPointer
    let size: Int
    let file: String
    var offset: Int = 0

    mutating func need(_ n: Int, _ what: @autoclosure () -> String) throws {
        guard n >= 0, offset <= size, size - offset >= n else {
            throw FulgurError.format(file, "truncated while reading \(what()) at byte \(offset) (file has \(size) bytes)")
        }
    }

    mutating func read<T: FixedWidthInteger>(_ type: T.Type, _ what: @autoclosure () -> String) throws -> T {
        try need(MemoryLayout<T>.size, what())
        let v = base.loadUnaligned(fromByteOffset: offset, as: T.self)
        offset += MemoryLayout<T>.size
        return T(littleEndian: v)
    }

    mutating func readBytes(_ n: Int, _ what: @autoclosure () -> String) throws -> UnsafeRawBufferPointer {
        try need(n, what())
        let b = UnsafeRawBufferPointer(start: base + offset, count: n)
        offset += n
        return b
    }
}
