"""sd-scripts' side of bench/prepare-dataset.sh: builds the dataset group of a DreamBooth layout
exactly as train_network.py does before training (its argparse parser, BlueprintGenerator,
generate_dataset_group_by_blueprint, which reads every image's size and makes the buckets), and
prints the images registered, wall seconds and images/s. No model is loaded.

    SD_PYTHON bench/sd_scripts_dataset.py SD_SCRIPTS TRAIN_DATA_DIR REG_DATA_DIR
"""
import sys
import time


def main():
    checkout, data, reg = sys.argv[1], sys.argv[2], sys.argv[3]
    sys.path.insert(0, checkout)
    started = time.time()
    import train_network
    from library import config_util, train_util

    imported = time.time()
    parser = train_network.setup_parser()
    args = parser.parse_args(
        [
            "--train_data_dir", data, "--reg_data_dir", reg, "--caption_extension", ".txt",
            "--resolution", "512", "--enable_bucket",
            "--output_dir", "unused", "--pretrained_model_name_or_path", "unused",
        ]
    )
    train_util.prepare_dataset_args(args, True)
    generator = config_util.BlueprintGenerator(config_util.ConfigSanitizer(True, True, False, True))
    user_config = {
        "datasets": [
            {"subsets": config_util.generate_dreambooth_subsets_config_by_subdirs(data, reg)}
        ]
    }
    blueprint = generator.generate(user_config, args)
    group, _ = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
    finished = time.time()
    images = sum(len(d.image_data) for d in group.datasets)
    seconds = finished - imported
    print(
        f"sd-scripts dataset group: {images} images, {seconds:.2f} s after imports "
        f"({images / seconds:.0f} images/s; imports {imported - started:.2f} s)"
    )


if __name__ == "__main__":
    main()
