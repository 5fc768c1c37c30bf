import ArgumentParser
import Fulgur

@main
struct FulgurCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "fulgur", abstract: "Fast MoE inference.")
}
