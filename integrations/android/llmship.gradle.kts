// llmship for an Android app module. In app/build.gradle.kts:   apply(from = "../llmship/integrations/android/llmship.gradle.kts")
//
// Runs `make android` before asset merging and syncs the result into src/main/assets/llmship, so the app
// loads artifacts with AssetManager from "llmship/<model>/<target>/" and reads "llmship/index.json".
// Gradle's up-to-date check (inputs: config + llmship's pyproject; outputs: the assets folder) skips the
// task when nothing changed; when it does run, llmship's input hash makes unchanged targets a no-op.
// A failed gate fails the Gradle build.
//
// Properties (gradle.properties or -P): llmship.root (default ../llmship), llmship.config (default llmship.yaml).

val llmshipRoot = file(providers.gradleProperty("llmship.root").getOrElse("../llmship"))
val llmshipConfig = file(providers.gradleProperty("llmship.config").getOrElse("llmship.yaml"))
val llmshipOut = layout.buildDirectory.dir("llmship")

val llmshipBuild = tasks.register<Exec>("llmshipBuild") {
    group = "llmship"
    description = "Export, validate and gate the Android artifacts with llmship"
    inputs.file(llmshipConfig)
    inputs.file(File(llmshipRoot, "pyproject.toml"))
    outputs.dir(llmshipOut.map { it.dir("android/assets/llmship") })
    commandLine("make", "-C", llmshipRoot.absolutePath, "android",
        "CONFIG=${llmshipConfig.absolutePath}", "OUT=${llmshipOut.get().asFile.absolutePath}")
}

val llmshipAssets = tasks.register<Sync>("llmshipAssets") {
    group = "llmship"
    description = "Copy llmship's artifacts into src/main/assets/llmship"
    dependsOn(llmshipBuild)
    from(llmshipOut.map { it.dir("android/assets/llmship") })
    into(layout.projectDirectory.dir("src/main/assets/llmship"))
}

// Every variant's asset merge (mergeDebugAssets, mergeReleaseAssets, ...) waits for the artifacts.
tasks.matching { it.name.startsWith("merge") && it.name.endsWith("Assets") }.configureEach {
    dependsOn(llmshipAssets)
}
