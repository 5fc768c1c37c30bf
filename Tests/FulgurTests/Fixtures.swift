import Foundation
@testable import Fulgur

/// Paths of committed test fixtures.
enum Fixtures {
    static var root: String { Bundle.module.resourcePath! + "/Fixtures" }
    static func path(_ relative: String) -> String { root + "/" + relative }
}
