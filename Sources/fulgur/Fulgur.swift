import ArgumentParser
@main struct FulgurCommand: ParsableCommand {}
